//! refine-poi: check-ins to prompts, a candle causal LM with LoRA, GRPO with recommendation
//! rewards, and one evaluation protocol for models and baselines alike.

pub mod commands;
pub mod fsutil;
pub mod model;
pub mod generate;
pub mod data;
pub mod metrics;
pub mod baselines;
pub mod eval;
pub mod answer;
pub mod prompt;
pub mod visits;
pub mod runtime;
pub mod seed;
pub mod llm_rec;
pub mod config;
pub mod train;
pub mod report;

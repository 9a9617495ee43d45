//! refine-poi: check-ins to prompts, a candle causal LM with LoRA, GRPO with recommendation
//! rewards, and one evaluation protocol for models and baselines alike.

pub mod answer;
pub mod baselines;
pub mod beam;
pub mod commands;
pub mod compare;
pub mod config;
pub mod constrain;
pub mod data;
pub mod dist;
pub mod eval;
pub mod fsutil;
pub mod generate;
pub mod history_prompt;
pub mod llm_rec;
pub mod lock;
pub mod metrics;
pub mod model;
pub mod prompt;
pub mod prompt_stats;
pub mod ranker;
pub mod report;
pub mod retrieval;
pub mod runtime;
pub mod seed;
pub mod selfcheck;
pub mod stats;
pub mod train;
pub mod visits;

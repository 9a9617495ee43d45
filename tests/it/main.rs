//! The integration tests, one crate (each test binary links the whole library): the binary
//! driven end to end, tiny random models through every training path, and the default model
//! against the reference implementation.

mod cli_data;
mod cli_model;
mod common;
mod configs;
mod device_check;
mod dist;
mod grpo_tiny;
mod grpo_train;
mod model_tiny;
mod peft;
mod portable;
mod reference_model;
mod reliability;
mod semantic;
mod sft_tiny;
mod sweep;

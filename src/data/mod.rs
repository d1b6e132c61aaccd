//! Training data: tokenizers, the embedded default corpus (English text + generated facts) and
//! token batching.
//!
//! - [`tokenizer`]: GPT-2 BPE from the embedded `assets/gpt2` files (through the `tokenizers`
//!   crate), a 256-id byte tokenizer, or any Hugging Face `tokenizer.json`;
//! - [`corpus`]: the embedded Shakespeare text, generated factual sentences, and their mix
//!   ([`default_training_text`]), which is what `asa train-mini` trains on by default;
//! - [`batch`]: train/validation split, random training windows, fixed validation windows,
//!   and reading user text files.

pub mod batch;
pub mod corpus;
pub mod shards;
pub mod tokenizer;

pub use batch::{read_text_files, TokenData};
pub use corpus::{default_training_text, english_text, facts, CORPUS_ATTRIBUTION};
pub use tokenizer::{Tokenizer, TokenizerKind, GPT2_EOT};

//! Differential test: placeholder until written.

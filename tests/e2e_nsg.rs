//! End-to-end NSG tests: placeholder until written.

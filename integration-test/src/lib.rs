//! Empty: the privileged tests live in `tests/`; see Cargo.toml.

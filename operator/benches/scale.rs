//! Scale benchmark (not written yet).
fn main() {}

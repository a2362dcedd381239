//! botrelay-operator (the controller is being written; this commit only ships the CRD).
fn main() {
    eprintln!("botrelay-operator: the controller is not implemented yet");
    std::process::exit(1);
}

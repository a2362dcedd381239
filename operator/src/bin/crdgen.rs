//! Prints the MessagingEndpoint CRD as YAML: `cargo run -p botrelay-operator --bin crdgen > crds/messagingendpoints.botrelay.dev.yaml`.

fn main() {
    print!("{}", botrelay_operator::crd_yaml());
}

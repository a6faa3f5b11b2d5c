fn main() {
    eprintln!("nixq-agent: not implemented yet");
    std::process::exit(1);
}

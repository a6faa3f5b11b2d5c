fn main() {
    eprintln!("nixq-status: not implemented yet");
    std::process::exit(1);
}

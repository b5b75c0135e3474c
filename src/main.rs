fn main() {
    std::process::exit(soci_node::cli::main());
}

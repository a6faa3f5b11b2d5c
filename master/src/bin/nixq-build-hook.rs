//! `nixq-build-hook`: Nix's build hook, building on nixq agents. Nix runs
//! it (`build-hook = /path/to/nixq-build-hook` in `nix.conf`, or
//! `NIX_BUILD_HOOK` for the classic protocols); see [`nixq_master::hook`].

fn main() -> std::process::ExitCode {
    nixq_common::alloc::limit_malloc_arenas();
    nixq_master::hook::run::main()
}

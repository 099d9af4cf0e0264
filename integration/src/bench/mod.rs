//! `clockvmm bench` (being written).

pub mod strategies;

/// Run the benchmark.
pub fn run(
    _json: Option<&std::path::Path>,
    _svg: Option<&std::path::Path>,
    _quick: bool,
) -> Result<(), String> {
    Err("bench: not implemented yet".into())
}

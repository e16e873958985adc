//! `brambled`: loads one model image and serves it on the serial console and
//! over TCP (NDJSON and OpenAI-compatible HTTP). See `board/brambled.toml`
//! for the configuration and the README's `brambled` section for the protocols.

use bramble_board::config::{Config, Overrides, USAGE};
use bramble_runtime::allocations::CountingAllocator;
use std::process::ExitCode;

// Counts allocations so the daemon can report, per generation, that its
// decode loop made none (`/health`'s `decode_allocations`, the console's
// `/stats`): the promise is checked where it matters, in the running daemon.
#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let config = match Overrides::parse(args).and_then(|overrides| Config::load(&overrides)) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("brambled: {error}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    bramble_board::logger::init(config.log_level);
    match bramble_board::daemon::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            log::error!("{error}");
            ExitCode::FAILURE
        }
    }
}

//! The `bramble` subcommands, one module each: its options (`…Args`) and
//! `run(args)`. Option groups several subcommands share have their own
//! modules: [`model_args`] (loading a model) and [`sampling_args`].

/// `println!` that ends the program quietly when stdout is a closed pipe
/// (`bramble … | head -1`) instead of panicking.
// Defined before the modules below so that each of them can use it.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(error) = writeln!(std::io::stdout(), $($arg)*) {
            if error.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
        }
    }};
}

pub mod bench;
pub mod bias_calibrate;
pub mod bias_data;
pub mod bias_eval;
pub mod calibrate;
pub mod chat;
pub mod convert;
pub mod generate;
pub mod inspect;
pub mod model_args;
pub mod perplexity;
pub mod sampling_args;
pub mod synth;
pub mod tokenize;

/// The number of cores: what every `--threads` defaults to.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Test helper: every value clap lists for the `ValueEnum` `A` converts to
/// the library value `parse` reads from the same name, so a flag and the
/// library cannot disagree on what a name means.
#[cfg(test)]
pub fn assert_values_parse_alike<A, L>(parse: impl Fn(&str) -> Option<L>)
where
    A: clap::ValueEnum + Copy,
    L: From<A> + PartialEq + std::fmt::Debug,
{
    for value in A::value_variants() {
        let name = value.to_possible_value().expect("every value is listed");
        assert_eq!(parse(name.get_name()), Some(L::from(*value)), "the value {:?}", name.get_name());
    }
}

//! `brambled`, the on-device daemon. For now it loads and checks an image and
//! exits; serving over UART and TCP is the daemon issue's work.

use bramble_runtime::model::Model;
use bramble_runtime::tokenizer::Tokenizer;
use bramble_runtime::ModelImage;
use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let model = match (args.next().as_deref(), args.next()) {
        (Some("--model"), Some(path)) => PathBuf::from(path),
        _ => {
            eprintln!("usage: brambled --model IMG");
            return ExitCode::from(2);
        }
    };
    let loaded = ModelImage::open(&model).and_then(|image| {
        let tokenizer = Tokenizer::new(image.vocab())?;
        let summary = {
            let model = Model::new(&image)?;
            let c = &model.config;
            format!(
                "{}: llama dim {} layers {} vocab {} ({} tokenizer tokens), {:.1} MiB of weights, kernels {}",
                image.path().display(),
                c.dim,
                c.n_layers,
                c.vocab_size,
                tokenizer.vocab().len(),
                image.weight_bytes() as f64 / (1 << 20) as f64,
                model.kernels.name
            )
        };
        Ok(summary)
    });
    match loaded {
        Ok(summary) => {
            println!("brambled: loaded {summary}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("brambled: {error}");
            ExitCode::FAILURE
        }
    }
}

//! `bramble calibrate` (R-Sparse) on tiny synthetic models: the
//! column scores, the low-rank factors' optimality, the thresholds' masked
//! share on the calibration data, the written image (the input's bytes plus
//! the `rsparse` section), the search's budget, and the command's errors.

use bramble_runtime::model::{Logits, Model, Site};
use bramble_runtime::rsparse::{Rsparse, SparseModule};
use bramble_runtime::tokenizer::Tokenizer;
use bramble_runtime::vocab::TokenizerKind;
use bramble_runtime::ModelImage;
use bramble_tests::*;
use bramble_tools::calibrate::{
    calibrate, calibration_tokens, low_rank, masked_share, CalibrateOptions, Rng, SearchOptions, PROJECTIONS,
};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Calibration text: plain English, which every synthetic vocabulary spells
/// (byte fallback or byte-level BPE).
fn calibration_text() -> String {
    let lines = [
        "Now is the winter of our discontent made glorious summer by this sun of York;",
        "and all the clouds that lour'd upon our house in the deep bosom of the ocean buried.",
        "Now are our brows bound with victorious wreaths; our bruised arms hung up for monuments;",
        "our stern alarums changed to merry meetings, our dreadful marches to delightful measures.",
    ];
    lines.iter().cycle().take(40).copied().collect::<Vec<_>>().join("\n")
}

/// A synthetic model converted to `quant`, with the calibration text beside it.
struct Fixture {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    image: PathBuf,
    text: PathBuf,
}

fn fixture(quant: &str, tokenizer: TokenizerKind) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let model = synthetic(synth_cli_shape(64, 2, false, tokenizer), 7);
    let image = path.join(format!("model-{quant}.bramble"));
    convert_synthetic(&model, &image, quant);
    let text = path.join("calibration.txt");
    std::fs::write(&text, calibration_text()).unwrap();
    Fixture { _dir: dir, dir: path, image, text }
}

fn options(sparsity: f32) -> CalibrateOptions {
    CalibrateOptions { sparsity, tokens: 512, ctx: 128, threads: 1, ..CalibrateOptions::default() }
}

fn plan_of(image: &ModelImage) -> Rsparse {
    Rsparse::from_section(image.section("rsparse").expect("an rsparse section")).expect("a valid rsparse section")
}

/// The dequantized weight of a tensor, row-major.
fn weight(image: &ModelImage, name: &str) -> (Vec<f32>, usize, usize) {
    let info = image.tensor(name).unwrap();
    let (rows, cols) = (info.rows(), info.cols());
    let mut out = vec![0f32; rows * cols];
    let view = bramble_runtime::model::Matrix { rows, cols, data: image.tensor_view(info) };
    for (r, row) in out.chunks_exact_mut(cols).enumerate() {
        view.row_to_f32(r, row);
    }
    (out, rows, cols)
}

/// With `--sparse-layout rows` every tensor is copied byte for byte; with
/// the default `channels` the covered Q8/Q4 projections are channel-major
/// and hold exactly the same values, every other tensor byte for byte.
#[test]
fn scores_are_column_norms_and_the_image_keeps_every_input_value() {
    use bramble_tools::calibrate::SparseLayout;
    for (quant, layout) in [
        ("q4", SparseLayout::Channels),
        ("q4", SparseLayout::Rows),
        ("q8", SparseLayout::Channels),
        ("f16", SparseLayout::Channels),
        ("f32", SparseLayout::Channels),
    ] {
        let f = fixture(quant, TokenizerKind::SentencePiece);
        let output = f.dir.join("sparse.bramble");
        let report = calibrate(&f.image, &calibration_text(), &output, &CalibrateOptions { layout, ..options(0.5) })
            .unwrap_or_else(|e| panic!("{quant}: {e:#}"));
        let input = ModelImage::open(&f.image).unwrap();
        let written = ModelImage::open(&output).unwrap();
        // Every tensor, byte for byte (or its values, channel-major), and every section but the new one.
        assert_eq!(input.tensors().len(), written.tensors().len());
        let mut relaid = 0;
        for t in input.tensors() {
            let w = written.tensor(&t.name).unwrap_or_else(|| panic!("{quant}: {} missing", t.name));
            assert_eq!(&w.shape, &t.shape, "{quant}: {}", t.name);
            if w.encoding != t.encoding {
                assert_eq!(layout, SparseLayout::Channels, "{quant}: {} changed with rows", t.name);
                assert_eq!(Some(w.encoding), t.encoding.channel_major(), "{quant}: {}", t.name);
                let (a, _, _) = weight(&input, &t.name);
                let (b, _, _) = weight(&written, &t.name);
                assert!(a == b, "{quant}: {} values differ", t.name);
                relaid += 1;
                continue;
            }
            assert!(input.tensor_bytes(t) == written.tensor_bytes(w), "{quant}: {} bytes differ", t.name);
        }
        let expected = if layout == SparseLayout::Channels && (quant == "q4" || quant == "q8") { 2 * 7 } else { 0 };
        assert_eq!(
            relaid, expected,
            "{quant} {layout:?}: channel-major projections (every shape is whole tiles of 32)"
        );
        for s in input.sections() {
            if s.name != "tensor_index" && s.name != "tensor_data" {
                assert_eq!(input.section(&s.name), written.section(&s.name), "{quant}: section {}", s.name);
            }
        }
        let plan = plan_of(&written);
        assert_eq!(plan.modules.len(), 2 * 7, "{quant}: every projection of both layers");
        assert_eq!(plan.target, 0.5);
        assert_eq!(report.modules.len(), plan.modules.len());
        for (m, r) in plan.modules.iter().zip(&report.modules) {
            assert_eq!((&m.name, m.rank, m.threshold, m.sparsity, m.alpha), (&r.name, r.rank, r.threshold, 0.5, 0.95));
            let (kept, rank) = SparseModule::budget(m.rows, m.cols, 0.5, 0.95);
            assert_eq!((r.kept, m.rank), (kept, rank), "{quant} {}", m.name);
            // c_i = ‖W[:, i]‖₂ of the dequantized weight.
            let (w, rows, cols) = weight(&input, &m.name);
            for i in 0..cols {
                let norm = (0..rows).map(|r| (w[r * cols + i] as f64).powi(2)).sum::<f64>().sqrt();
                assert!(
                    (m.scores[i] as f64 - norm).abs() <= 1e-5 * norm.max(1.0),
                    "{quant} {} column {i}: score {} norm {norm}",
                    m.name,
                    m.scores[i]
                );
            }
        }
        assert!((report.achieved - 0.5).abs() < 1e-6);
        // The FFN modules are big enough for a low-rank path at α = 0.95 (k and v of 32 rows are not).
        assert!(plan.modules.iter().filter(|m| m.name.contains("ffn")).all(|m| m.rank > 0), "{quant}");
    }
}

/// `W = A · diag(σ) · Bᵀ` with orthonormal `A` (`rows × k`), `B` (`cols × k`).
fn with_singular_values(rows: usize, cols: usize, sigma: &[f64], seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    // k orthonormal columns of length n (Gram–Schmidt, twice for accuracy), column by column.
    let orthonormal = |n: usize, rng: &mut Rng| {
        let mut columns: Vec<Vec<f64>> = Vec::new();
        for _ in 0..sigma.len() {
            let mut v: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
            for _ in 0..2 {
                for c in &columns {
                    let dot: f64 = v.iter().zip(c).map(|(a, b)| a * b).sum();
                    v.iter_mut().zip(c).for_each(|(a, b)| *a -= dot * b);
                }
            }
            let norm = v.iter().map(|a| a * a).sum::<f64>().sqrt();
            columns.push(v.into_iter().map(|a| a / norm).collect());
        }
        columns
    };
    let (a, b) = (orthonormal(rows, &mut rng), orthonormal(cols, &mut rng));
    let mut w = vec![0f32; rows * cols];
    for i in 0..rows {
        for j in 0..cols {
            w[i * cols + j] = sigma.iter().enumerate().map(|(k, s)| a[k][i] * s * b[k][j]).sum::<f64>() as f32;
        }
    }
    w
}

#[test]
fn low_rank_factors_are_rank_r_optimal() {
    // Eckart–Young: the best rank-r error² is the sum of the dropped σ².
    // (rows, cols, rank): the randomized path (sketch ≪ min side) and the exact one.
    for (rows, cols, rank) in [(300, 160, 12), (200, 96, 30), (64, 128, 8)] {
        let sigma: Vec<f64> = (0..60.min(rows.min(cols))).map(|i| 10.0 * 0.9f64.powi(i as i32)).collect();
        let w = with_singular_values(rows, cols, &sigma, rows as u64);
        let factors = low_rank(&w, rows, cols, rank, 10, 2, 5).unwrap();
        assert_eq!((factors.u.len(), factors.sv.len()), (rows * rank, rank * cols));
        for (i, s) in sigma.iter().take(rank).enumerate() {
            assert!(
                (factors.singular_values[i] as f64 - s).abs() < 1e-3 * s,
                "σ{i}: {} vs {s}",
                factors.singular_values[i]
            );
        }
        let mut error = 0f64;
        for i in 0..rows {
            for j in 0..cols {
                let approx: f32 = (0..rank).map(|k| factors.u[i * rank + k] * factors.sv[k * cols + j]).sum();
                error += (w[i * cols + j] as f64 - approx as f64).powi(2);
            }
        }
        let optimal: f64 = sigma[rank..].iter().map(|s| s * s).sum();
        // 1% over the optimum: f32 rounding and the randomized range finder's slack.
        assert!(error <= optimal * 1.01 + 1e-6, "{rows}×{cols} rank {rank}: error² {error}, optimum {optimal}");
        assert!(
            error >= optimal * 0.99 - 1e-6,
            "{rows}×{cols} rank {rank}: error² {error} below the optimum {optimal}?"
        );
    }
    // Rank 0 is no factors.
    assert!(low_rank(&[1.0; 64], 8, 8, 0, 10, 2, 1).unwrap().u.is_empty());
}

#[test]
fn thresholds_mask_the_requested_share_of_the_calibration_data() {
    for (sparsity, alpha) in [(0.5, 0.95), (0.3, 0.9), (0.7, 1.0)] {
        let f = fixture("q8", TokenizerKind::ByteLevelBpe);
        let output = f.dir.join("sparse.bramble");
        // A sample smaller than each site's entries (512 tokens × 64 or 160), so the reservoir is exercised.
        let options = CalibrateOptions { alpha, samples: 16384, ..options(sparsity) };
        calibrate(&f.image, &calibration_text(), &output, &options).unwrap();
        let image = ModelImage::open(&output).unwrap();
        let plan = plan_of(&image);
        // The same activations calibration saw: the dense model over the same windows.
        let tokenizer = Tokenizer::new(image.vocab()).unwrap();
        let tokens = calibration_tokens(&tokenizer, &calibration_text(), options.tokens).unwrap();
        let model = Model::new(&image).unwrap();
        let mut state = model.new_state(options.ctx, options.batch);
        let mut seen: HashMap<(usize, Site), Vec<f32>> = HashMap::new();
        for window in tokens.chunks(options.ctx) {
            let mut pos = 0;
            while pos < window.len() {
                let n = options.batch.min(window.len() - pos);
                let mut see =
                    |l: usize, site: Site, values: &[f32]| seen.entry((l, site)).or_default().extend_from_slice(values);
                model.forward_observed(&mut state, &window[pos..pos + n], pos, Logits::Last, Some(&mut see)).unwrap();
                pos += n;
            }
        }
        for m in &plan.modules {
            let (layer, part) = m.name.strip_prefix("blk.").unwrap().split_once('.').unwrap();
            let part = part.strip_suffix(".weight").unwrap();
            let site = [Site::AttentionInput, Site::AttentionOutput, Site::FfnInput, Site::FfnHidden]
                .into_iter()
                .find(|s| s.modules().contains(&part))
                .unwrap();
            let values = &seen[&(layer.parse::<usize>().unwrap(), site)];
            let (kept, _) = SparseModule::budget(m.rows, m.cols, sparsity, alpha);
            let wanted = 1.0 - kept as f64 / m.cols as f64;
            let share = masked_share(values, &m.scores, m.threshold);
            assert!(
                (share - wanted).abs() <= 0.02,
                "s {sparsity} α {alpha} {}: masked {share:.4}, wanted {wanted:.4}",
                m.name
            );
            if alpha == 1.0 {
                assert!(m.rank == 0 && m.scores.iter().all(|&c| c == 1.0), "{}: α = 1 is pure input sparsity", m.name);
            }
        }
    }
}

#[test]
fn search_keeps_the_model_level_budget() {
    let f = fixture("q8", TokenizerKind::SentencePiece);
    let model = synthetic(synth_cli_shape(64, 4, false, TokenizerKind::SentencePiece), 11);
    let image = f.dir.join("four-layers.bramble");
    convert_synthetic(&model, &image, "q8");
    let output = f.dir.join("searched.bramble");
    let search = SearchOptions { population: 6, generations: 3, tokens: 128 };
    let options = CalibrateOptions { search: Some(search), ..options(0.4) };
    let report = calibrate(&image, &calibration_text(), &output, &options).unwrap();
    let search = report.search.as_ref().expect("a search report");
    assert_eq!(search.evaluations, 6 + 2 * (6 - 1));
    assert!(search.best_perplexity <= search.uniform_perplexity, "the uniform plan is a candidate");
    assert!(search.best_perplexity.is_finite());
    // The written plan: module sparsities weighted by weight count average to the target.
    let plan = plan_of(&ModelImage::open(&output).unwrap());
    let total: f64 = plan.modules.iter().map(|m| (m.rows * m.cols) as f64).sum();
    let mean: f64 = plan.modules.iter().map(|m| m.sparsity as f64 * (m.rows * m.cols) as f64).sum::<f64>() / total;
    assert!((mean - 0.4).abs() < 1e-5, "weighted mean sparsity {mean}");
    assert!((report.achieved - 0.4).abs() < 1e-5);
    for m in &plan.modules {
        assert!((0.0..1.0).contains(&m.sparsity) && m.alpha > 0.0 && m.alpha <= 1.0, "{}", m.name);
        let (_, rank) = SparseModule::budget(m.rows, m.cols, m.sparsity, m.alpha);
        assert_eq!(m.rank, rank, "{}: the rank follows its own (s, α)", m.name);
    }
    // Each layer's seven modules share one (s, α), as the search allocates per layer.
    for l in 0..4 {
        let layer: Vec<_> = plan.modules.iter().filter(|m| m.name.starts_with(&format!("blk.{l}."))).collect();
        assert_eq!(layer.len(), PROJECTIONS.len());
        assert!(layer.iter().all(|m| (m.sparsity, m.alpha) == (layer[0].sparsity, layer[0].alpha)));
    }
}

fn assert_fails(args: &[&std::ffi::OsStr], needle: &str, output_path: &Path) {
    let out = bramble(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "`{}` succeeded", command_line(args));
    assert!(stderr.contains(needle), "`{}`: stderr lacks {needle:?}:\n{stderr}", command_line(args));
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!output_path.exists(), "a failed calibration left {}", output_path.display());
}

#[test]
fn bad_arguments_are_clear_errors() {
    let f = fixture("q4", TokenizerKind::SentencePiece);
    let output = f.dir.join("out.bramble");
    let (image, text, out) = (f.image.as_os_str(), f.text.as_os_str(), output.as_os_str());
    let run = |sparsity: &str, text: &std::ffi::OsStr, extra: &[&str]| {
        let mut args: Vec<&std::ffi::OsStr> = vec![
            "calibrate".as_ref(),
            "--model".as_ref(),
            image,
            "--text".as_ref(),
            text,
            "--sparsity".as_ref(),
            sparsity.as_ref(),
            "--output".as_ref(),
            out,
            "--tokens".as_ref(),
            "64".as_ref(),
        ];
        args.extend(extra.iter().map(std::ffi::OsStr::new));
        args.into_iter().map(|a| a.to_os_string()).collect::<Vec<_>>()
    };
    let check = |args: Vec<std::ffi::OsString>, needle: &str| {
        let refs: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
        assert_fails(&refs, needle, &output);
    };
    check(run("1.0", text, &[]), "--sparsity 1");
    check(run("-0.1", text, &[]), "--sparsity -0.1");
    check(run("0.5", text, &["--alpha", "0"]), "--alpha 0");
    let missing = f.dir.join("no-such.txt");
    check(run("0.5", missing.as_os_str(), &[]), "no-such.txt");
    let empty = f.dir.join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    check(run("0.5", empty.as_os_str(), &[]), "calibration text gives 0 tokens");
    let binary = f.dir.join("binary.txt");
    std::fs::write(&binary, [0xffu8, 0xfe, 0x00, 0x41]).unwrap();
    check(run("0.5", binary.as_os_str(), &[]), "not UTF-8");
    check(run("0.5", text, &["--search", "--population", "1"]), "--population 1");
    let not_image = f.text.as_os_str();
    let mut args = run("0.5", text, &[]);
    args[2] = not_image.to_os_string();
    check(args, "calibration.txt");
    // And the good case through the command line, with --json and inspect's summary.
    let args = run("0.5", text, &["--json"]);
    let report = first_json_line(&bramble_ok(&args));
    assert_eq!(report["modules"].as_array().unwrap().len(), 14);
    assert!(report["peak_rss_bytes"].as_u64().unwrap() > 0);
    assert!(report["seconds"].as_f64().unwrap() > 0.0);
    let inspect = bramble_json(&["inspect".as_ref(), out, "--json".as_ref()]);
    assert_eq!(inspect["rsparse"]["modules"], 14);
    assert!(inspect["rsparse"]["mean_rank"].as_f64().unwrap() > 0.0);
    let text_out = bramble_ok(&["inspect".as_ref(), out]);
    assert!(text_out.contains("rsparse: 14 modules, target 0.5"), "{text_out}");

    // The calibrated image runs sparse by default: bench measures the share of
    // channels sent to the low-rank part, allocation-free; `--sparsity off` is dense.
    let bench = |sparsity: &str| {
        bramble_json(&[
            "bench".as_ref(),
            "--model".as_ref(),
            out,
            "--prompt-tokens".as_ref(),
            "8".as_ref(),
            "--gen-tokens".as_ref(),
            "16".as_ref(),
            "--threads".as_ref(),
            "2".as_ref(),
            "--sparsity".as_ref(),
            sparsity.as_ref(),
            "--json".as_ref(),
        ])
    };
    let sparse = bench("auto");
    let share = sparse["measured_sparsity"].as_f64().expect("a measured sparsity");
    assert!((0.2..0.9).contains(&share), "measured sparsity {share} for a 0.5 plan");
    assert_eq!(sparse["allocations_per_token"].as_f64(), Some(0.0));
    assert!(bench("off")["measured_sparsity"].is_null());
    let generated = bramble_ok(&[
        "generate".as_ref(),
        "--model".as_ref(),
        out,
        "--prompt".as_ref(),
        "Now is".as_ref(),
        "--max-tokens".as_ref(),
        "8".as_ref(),
        "--temperature".as_ref(),
        "0".as_ref(),
        "--json".as_ref(),
    ]);
    assert!(first_json_line(&generated)["generated_tokens"].as_u64().is_some_and(|n| n > 0), "{generated}");
}

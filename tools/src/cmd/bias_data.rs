//! `bramble bias-data`: WinoBias, CrowS-Pairs or StereoSet as bias pairs
//! (JSONL), or WinoBias as pronoun-fill items.

use anyhow::Result;
use bramble_tools::bias::{convert_dataset, pronoun_fill_items, write_fill_items, write_pairs, Dataset};
use clap::{Args, ValueEnum};
use std::path::PathBuf;

/// `--from`: the public [`Dataset`] read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DatasetArg {
    Winobias,
    CrowsPairs,
    Stereoset,
    PronounFill,
}

impl From<DatasetArg> for Dataset {
    fn from(dataset: DatasetArg) -> Self {
        match dataset {
            DatasetArg::Winobias => Dataset::WinoBias,
            DatasetArg::CrowsPairs => Dataset::CrowsPairs,
            DatasetArg::Stereoset => Dataset::StereoSet,
            DatasetArg::PronounFill => Dataset::PronounFill,
        }
    }
}

/// `--split`: a WinoBias split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SplitArg {
    Dev,
    Test,
}

impl SplitArg {
    /// The name on the command line, which is the suffix of WinoBias's files.
    fn name(self) -> &'static str {
        match self {
            SplitArg::Dev => "dev",
            SplitArg::Test => "test",
        }
    }
}

#[derive(Args)]
pub struct BiasDataArgs {
    /// The dataset, followed by its path: `winobias DIR|FILE`, `crows-pairs CSV`,
    /// `stereoset JSON`, or `pronoun-fill DIR` (WinoBias's data directory; fill
    /// items for `bias-eval --fill`, not pairs).
    #[arg(long, value_enum)]
    from: DatasetArg,
    /// WinoBias: its data directory or one `pro_stereotyped_…` file; CrowS-Pairs:
    /// `crows_pairs_anonymized.csv`; StereoSet: `dev.json` or `test.json`.
    path: PathBuf,
    /// WinoBias directory: `dev` or `test` (default: both; pronoun-fill needs one,
    /// which also chooses its templates).
    #[arg(long, value_enum)]
    split: Option<SplitArg>,
    /// Keep only this category (`gender`, `race-color`, …). Repeatable.
    #[arg(long)]
    category: Vec<String>,
    /// pronoun-fill: each occupation's share of women from Winogender's
    /// `occupations-stats.tsv` (its `bls_pct_female`), into the items' `female_share`.
    #[arg(long, value_name = "TSV")]
    occupation_stats: Option<PathBuf>,
    /// The pairs (or items) file to write (JSONL).
    #[arg(long)]
    output: PathBuf,
}

pub fn run(args: BiasDataArgs) -> Result<()> {
    if args.from == DatasetArg::PronounFill {
        return run_pronoun_fill(&args);
    }
    anyhow::ensure!(args.occupation_stats.is_none(), "--occupation-stats goes with --from pronoun-fill");
    let mut pairs = convert_dataset(args.from.into(), &args.path, args.split.map(SplitArg::name))?;
    if !args.category.is_empty() {
        pairs.retain(|pair| args.category.contains(&pair.category));
        anyhow::ensure!(!pairs.is_empty(), "{}: no pairs of category {:?}", args.path.display(), args.category);
    }
    write_pairs(&pairs, &args.output)?;
    let mut counts = std::collections::BTreeMap::<&str, usize>::new();
    for pair in &pairs {
        *counts.entry(&pair.category).or_default() += 1;
    }
    let counts: Vec<String> = counts.iter().map(|(category, n)| format!("{category} {n}")).collect();
    outln!("wrote {} ({} pairs: {})", args.output.display(), pairs.len(), counts.join(", "));
    Ok(())
}

/// `--from pronoun-fill`: the fill items of one split.
fn run_pronoun_fill(args: &BiasDataArgs) -> Result<()> {
    anyhow::ensure!(args.category.is_empty(), "--category applies to pairs, not to --from pronoun-fill");
    let Some(split) = args.split else { anyhow::bail!("--from pronoun-fill needs --split dev or --split test") };
    let set = pronoun_fill_items(&args.path, split.name(), args.occupation_stats.as_deref())?;
    write_fill_items(&set.items, &args.output)?;
    let mut counts = std::collections::BTreeMap::<&str, usize>::new();
    for item in &set.items {
        *counts.entry(&item.source).or_default() += 1;
    }
    let counts: Vec<String> = counts.iter().map(|(source, n)| format!("{source} {n}")).collect();
    let cue_free = set.items.iter().filter(|item| item.gender.is_none()).count();
    let with_share = set.items.iter().filter(|item| item.female_share.is_some()).count();
    outln!(
        "wrote {} ({} items: {}; {cue_free} cue-free, {} factual, {with_share} with a female_share; {} WinoBias duplicates merged, {} left out)",
        args.output.display(),
        set.items.len(),
        counts.join(", "),
        set.items.len() - cue_free,
        set.duplicates,
        set.left_out.len()
    );
    for reason in &set.left_out {
        eprintln!("bramble: left out {reason}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each `--from` value is the dataset of that name.
    #[test]
    fn from_values_are_the_datasets() {
        crate::cmd::assert_values_parse_alike::<DatasetArg, Dataset>(|name| Dataset::parse(name).ok());
    }

    /// Each `--split` value's name is the one clap parses.
    #[test]
    fn split_names_are_the_listed_values() {
        for split in SplitArg::value_variants() {
            assert_eq!(split.to_possible_value().expect("every value is listed").get_name(), split.name());
        }
    }
}

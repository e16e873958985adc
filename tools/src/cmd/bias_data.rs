//! `bramble bias-data`: WinoBias, CrowS-Pairs or StereoSet as bias pairs (JSONL).

use anyhow::Result;
use bramble_tools::bias::{convert_dataset, write_pairs, Dataset};
use clap::{Args, ValueEnum};
use std::path::PathBuf;

/// `--from`: the public [`Dataset`] read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DatasetArg {
    Winobias,
    CrowsPairs,
    Stereoset,
}

impl From<DatasetArg> for Dataset {
    fn from(dataset: DatasetArg) -> Self {
        match dataset {
            DatasetArg::Winobias => Dataset::WinoBias,
            DatasetArg::CrowsPairs => Dataset::CrowsPairs,
            DatasetArg::Stereoset => Dataset::StereoSet,
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
    /// The dataset, followed by its path: `winobias DIR|FILE`, `crows-pairs CSV`, `stereoset JSON`.
    #[arg(long, value_enum)]
    from: DatasetArg,
    /// WinoBias: its data directory or one `pro_stereotyped_…` file; CrowS-Pairs:
    /// `crows_pairs_anonymized.csv`; StereoSet: `dev.json` or `test.json`.
    path: PathBuf,
    /// WinoBias directory: `dev` or `test` (default: both).
    #[arg(long, value_enum)]
    split: Option<SplitArg>,
    /// Keep only this category (`gender`, `race-color`, …). Repeatable.
    #[arg(long)]
    category: Vec<String>,
    /// The pairs file to write (JSONL).
    #[arg(long)]
    output: PathBuf,
}

pub fn run(args: BiasDataArgs) -> Result<()> {
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

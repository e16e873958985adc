//! The residual stream of every layer where each fill item's pronoun is
//! chosen, for analyses outside the tool (`scripts/bias-r-ceiling.py
//! --linear`):
//!
//!     cargo run --release -p bramble-tools --example site_states -- IMAGE ITEMS OUT
//!
//! writes `OUT.f32` (sites × layers × dim, little-endian f32, read at the
//! prefix's last token, whose logits choose the pronoun) and `OUT.tsv`
//! (`# layers L dim D`, then a line a site: item line, first-token lean
//! log P(he) − log P(she), listed gender, stated gender, occupation).
use anyhow::{bail, Context, Result};
use bramble_runtime::model::Model;
use bramble_runtime::tokenizer::Tokenizer;
use bramble_tools::bias::{pronoun_sites, read_fill_items, read_sites, Gender, SitePosition};
use std::io::Write;
use std::path::Path;

const CONTEXT: usize = 256;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [image, items, out] = args.as_slice() else {
        bail!("usage: site_states IMAGE ITEMS OUT");
    };
    let image = bramble_runtime::ModelImage::open(Path::new(image)).with_context(|| format!("opening {image}"))?;
    let tokenizer = Tokenizer::new(image.vocab())?;
    let model = Model::with_options(&image, bramble_runtime::kernels::Kernels::detect(), 2)?;
    let items = read_fill_items(Path::new(items))?;
    let (sites, _) = pronoun_sites(&tokenizer, None, &items, CONTEXT)?;
    let mut state = model.try_new_state(CONTEXT, 64)?;
    let mut states = Vec::new();
    let leans = read_sites(&model, &mut state, &sites, Some((&mut states, SitePosition::Pronoun)), &mut |_, _| {})?;
    std::fs::write(format!("{out}.f32"), bytemuck::cast_slice::<f32, u8>(&states))?;
    let (layers, dim) = (model.weights.layers.len(), model.config.dim);
    let mut table = std::io::BufWriter::new(std::fs::File::create(format!("{out}.tsv"))?);
    writeln!(table, "# layers {layers} dim {dim}")?;
    let name = |g: Option<Gender>| match g {
        Some(Gender::Female) => "female",
        Some(Gender::Male) => "male",
        None => "-",
    };
    for (site, lean) in sites.iter().zip(&leans) {
        writeln!(table, "{}\t{lean}\t{}\t{}\t{}", site.line, name(site.listed), name(site.gender), site.occupation)?;
    }
    eprintln!("{} sites, {layers} layers of {dim}", sites.len());
    Ok(())
}

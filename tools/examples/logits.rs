//! Prints the top logits of the last position for a token sequence: `logits IMG "1 2 3" [OUT.f32]`.
use bramble_runtime::model::{Logits, Model};
use bramble_runtime::ModelImage;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let image = ModelImage::open(std::path::Path::new(&args[1]))?;
    let model = Model::new(&image)?;
    let tokens: Vec<u32> = args[2].split_whitespace().map(|t| t.parse().unwrap()).collect();
    let mut state = model.new_state(tokens.len(), tokens.len());
    let logits = model.forward(&mut state, &tokens, 0, Logits::Last)?.to_vec();
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    for &i in &order[..5] {
        println!("{i} {:.4}", logits[i]);
    }
    if let Some(out) = args.get(3) {
        std::fs::write(out, bytemuck::cast_slice(&logits))?;
    }
    Ok(())
}

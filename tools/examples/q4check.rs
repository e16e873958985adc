use bramble_runtime::image::TensorView;
use bramble_runtime::kernels::Kernels;
use bramble_runtime::quant::*;
use bramble_runtime::ModelImage;
fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let image = ModelImage::open(std::path::Path::new(&args[1]))?;
    let info = image.tensor(&args[2]).unwrap();
    let (rows, cols) = (info.rows(), info.cols());
    let mut x = vec![0f32; cols];
    for (i, v) in x.iter_mut().enumerate() { *v = ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * if i % 97 == 0 { 20.0 } else { 1.0 }; }
    let mut xq = vec![BlockQ8Act { d: 0.0, s: 0.0, qs: [0; 32] }; cols / 32];
    (Kernels::SCALAR.quantize_activation)(&x, &mut xq);
    let mut w = vec![0f32; rows * cols];
    dequantize_from(info.encoding, image.tensor_bytes(info), &mut w);
    let mut exact = vec![0f32; rows];
    (Kernels::SCALAR.matmul_f32)(&w, rows, cols, &x, &mut exact);
    let mut got = vec![0f32; rows];
    match image.tensor_view(info) {
        TensorView::Q4(b) => (Kernels::SCALAR.matmul_q4)(b, rows, cols, &xq, &mut got),
        TensorView::Q8(b) => (Kernels::SCALAR.matmul_q8)(b, rows, cols, &xq, &mut got),
        _ => panic!(),
    }
    let err: f32 = exact.iter().zip(&got).map(|(a, b)| (a - b).powi(2)).sum::<f32>().sqrt();
    let norm: f32 = exact.iter().map(|a| a * a).sum::<f32>().sqrt();
    println!("{} {:?} rel err {}", args[2], info.encoding, err / norm);
    let mut xd = vec![0f32; cols];
    for (b, o) in xq.iter().zip(xd.chunks_exact_mut(32)) { for j in 0..32 { o[j] = b.d * b.qs[j] as f32; } }
    let mut exact2 = vec![0f32; rows];
    (Kernels::SCALAR.matmul_f32)(&w, rows, cols, &xd, &mut exact2);
    let e2: f32 = exact2.iter().zip(&got).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    println!("kernel vs f32 on dequantized operands: max abs {e2}, max {}", exact2.iter().fold(0f32, |m, v| m.max(v.abs())));
    if let Some(out) = args.get(3) { std::fs::write(out, bytemuck::cast_slice(&got))?; }
    Ok(())
}

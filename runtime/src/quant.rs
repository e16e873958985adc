//! Block types of the quantized encodings, and their reference quantizers.
//!
//! The in-file blocks ([`BlockQ8`], [`BlockQ4`], [`BlockQ4S`], [`BlockQ5S`],
//! [`BlockQ5`]) are byte-for-byte ggml's Q8_0, Q4_1, Q4_0, Q5_0 and Q5_1 (see
//! `models/FORMAT.md`). Their row-interleaved forms ([`BlockQ8x4`],
//! [`BlockQ4x4`], [`BlockQ4Sx4`], [`BlockQ5Sx4`], [`BlockQ5x4`]) hold the same bytes of
//! four rows at one column block, rearranged so that one activation load
//! serves four rows and a vector's lanes are four rows' sums ([`Interleaved`]).
//! [`BlockQ8Act`] is the runtime's int8 form of an activation vector, never
//! stored in a file. ggml's k-quant super-blocks of 256 values
//! ([`crate::kquant`]: Q4_K, Q5_K, Q6_K, Q3_K, Q2_K) are encodings too, carried
//! byte for byte from a GGUF file, row-major or four rows interleaved
//! ([`BlockQ4Kx4`], [`BlockQ6Kx4`], [`BlockQ3Kx4`], [`BlockQ5Kx4`], [`BlockQ2Kx4`]).

use crate::kquant::{BlockQ2K, BlockQ3K, BlockQ4K, BlockQ5K, BlockQ6K, QK_K};
use bytemuck::{Pod, Zeroable};
use half::f16;

/// Values per quantization block of the 32-value encodings (Q8, Q4, Q4S and
/// their rearrangements); the k-quants' super-blocks hold [`QK_K`]
/// ([`Encoding::block_values`]).
pub const GROUP: usize = 32;

/// Tensor encodings, with their ids in the image's tensor index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encoding {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// int8, group 32, f16 scale ([`BlockQ8`]).
    Q8,
    /// 4-bit, group 32, f16 scale and f16 minimum ([`BlockQ4`]).
    Q4,
    /// 4-bit, group 32, f16 scale only, zero point 8 ([`BlockQ4S`]).
    Q4S,
    /// [`Encoding::Q8`], four rows interleaved ([`BlockQ8x4`]).
    Q8X4,
    /// [`Encoding::Q4`], four rows interleaved ([`BlockQ4x4`]).
    Q4X4,
    /// [`Encoding::Q4S`], four rows interleaved ([`BlockQ4Sx4`]).
    Q4SX4,
    /// [`Encoding::Q8`] blocks stored channel-major for the R-Sparse kernels
    /// ([`to_channel_major`]): each input channel's values contiguous.
    Q8C,
    /// [`Encoding::Q4`] blocks stored channel-major ([`to_channel_major`]).
    Q4C,
    /// ggml's Q4_K: 4-bit, super-blocks of 256 ([`BlockQ4K`]), row-major.
    Q4K,
    /// ggml's Q5_K: 5-bit, super-blocks of 256 ([`BlockQ5K`]), row-major.
    Q5K,
    /// ggml's Q6_K: 6-bit, super-blocks of 256 ([`BlockQ6K`]), row-major.
    Q6K,
    /// ggml's Q3_K: 3-bit, super-blocks of 256 ([`BlockQ3K`]), row-major.
    Q3K,
    /// [`Encoding::Q4K`], four rows interleaved ([`BlockQ4Kx4`]).
    Q4KX4,
    /// [`Encoding::Q6K`], four rows interleaved ([`BlockQ6Kx4`]).
    Q6KX4,
    /// [`Encoding::Q3K`], four rows interleaved ([`BlockQ3Kx4`]).
    Q3KX4,
    /// [`Encoding::Q5K`], four rows interleaved ([`BlockQ5Kx4`]).
    Q5KX4,
    /// 5-bit, group 32, f16 scale only, zero point 16 ([`BlockQ5S`]). ggml's Q5_0.
    Q5S,
    /// [`Encoding::Q5S`], four rows interleaved ([`BlockQ5Sx4`]).
    Q5SX4,
    /// 5-bit, group 32, f16 scale and f16 minimum ([`BlockQ5`]). ggml's Q5_1.
    Q5,
    /// [`Encoding::Q5`], four rows interleaved ([`BlockQ5x4`]).
    Q5X4,
    /// ggml's Q2_K: 2-bit, super-blocks of 256 ([`BlockQ2K`]), row-major.
    Q2K,
    /// [`Encoding::Q2K`], four rows interleaved ([`BlockQ2Kx4`]).
    Q2KX4,
    /// 4-bit, group 32, a byte scale and a byte offset a block under an f32
    /// scale a row ([`BlockQ4B`], [`Encoding::row_scale_bytes`]): Q4_1's
    /// levels in 4.5 bits a value.
    Q4B,
    /// [`Encoding::Q4B`], four rows interleaved ([`BlockQ4Bx4`]).
    Q4BX4,
    /// [`Encoding::Q4K`], eight rows interleaved, two rows' levels a byte
    /// ([`BlockQ4Kx8`]).
    Q4KX8,
}

impl Encoding {
    /// All encodings, in id order.
    pub const ALL: [Encoding; 27] = [
        Encoding::F32,
        Encoding::F16,
        Encoding::Q8,
        Encoding::Q4,
        Encoding::Q4S,
        Encoding::Q8X4,
        Encoding::Q4X4,
        Encoding::Q4SX4,
        Encoding::Q8C,
        Encoding::Q4C,
        Encoding::Q4K,
        Encoding::Q5K,
        Encoding::Q6K,
        Encoding::Q3K,
        Encoding::Q4KX4,
        Encoding::Q6KX4,
        Encoding::Q3KX4,
        Encoding::Q5KX4,
        Encoding::Q5S,
        Encoding::Q5SX4,
        Encoding::Q5,
        Encoding::Q5X4,
        Encoding::Q2K,
        Encoding::Q2KX4,
        Encoding::Q4B,
        Encoding::Q4BX4,
        Encoding::Q4KX8,
    ];

    /// The id stored in the tensor index.
    pub fn id(self) -> u32 {
        match self {
            Encoding::F32 => 0,
            Encoding::F16 => 1,
            Encoding::Q8 => 2,
            Encoding::Q4 => 3,
            Encoding::Q4S => 4,
            Encoding::Q8X4 => 5,
            Encoding::Q4X4 => 6,
            Encoding::Q4SX4 => 7,
            Encoding::Q8C => 8,
            Encoding::Q4C => 9,
            Encoding::Q4K => 10,
            Encoding::Q5K => 11,
            Encoding::Q6K => 12,
            Encoding::Q3K => 13,
            Encoding::Q4KX4 => 14,
            Encoding::Q6KX4 => 16,
            Encoding::Q3KX4 => 17,
            Encoding::Q5KX4 => 18,
            Encoding::Q5S => 19,
            Encoding::Q5SX4 => 20,
            Encoding::Q5 => 21,
            Encoding::Q5X4 => 22,
            Encoding::Q2K => 23,
            Encoding::Q2KX4 => 24,
            Encoding::Q4B => 25,
            Encoding::Q4BX4 => 26,
            Encoding::Q4KX8 => 27,
        }
    }
    /// The encoding of a tensor-index id.
    pub fn from_id(id: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|e| e.id() == id)
    }
    /// What a retired tensor-index id was, for ids this reader refuses by
    /// name rather than as unknown (their bytes meant something else once).
    pub fn retired(id: u32) -> Option<&'static str> {
        match id {
            15 => Some("the first Q6KX4 layout (before its high bits were stored flipped, now id 16)"),
            _ => None,
        }
    }
    /// Lower-case name, as the CLI spells it.
    pub fn name(self) -> &'static str {
        match self {
            Encoding::F32 => "f32",
            Encoding::F16 => "f16",
            Encoding::Q8 => "q8",
            Encoding::Q4 => "q4",
            Encoding::Q4S => "q4s",
            Encoding::Q8X4 => "q8x4",
            Encoding::Q4X4 => "q4x4",
            Encoding::Q4SX4 => "q4sx4",
            Encoding::Q8C => "q8c",
            Encoding::Q4C => "q4c",
            Encoding::Q4K => "q4k",
            Encoding::Q5K => "q5k",
            Encoding::Q6K => "q6k",
            Encoding::Q3K => "q3k",
            Encoding::Q4KX4 => "q4kx4",
            Encoding::Q6KX4 => "q6kx4",
            Encoding::Q3KX4 => "q3kx4",
            Encoding::Q5KX4 => "q5kx4",
            Encoding::Q5S => "q5s",
            Encoding::Q5SX4 => "q5sx4",
            Encoding::Q5 => "q5",
            Encoding::Q5X4 => "q5x4",
            Encoding::Q2K => "q2k",
            Encoding::Q2KX4 => "q2kx4",
            Encoding::Q4B => "q4b",
            Encoding::Q4BX4 => "q4bx4",
            Encoding::Q4KX8 => "q4kx8",
        }
    }
    /// The encoding a CLI name stands for.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|e| e.name() == name)
    }
    /// Whether rows are stored as blocks ([`Encoding::block_values`] values each).
    pub fn is_blocked(self) -> bool {
        !matches!(self, Encoding::F32 | Encoding::F16)
    }
    /// Whether this is one of ggml's k-quants (super-blocks of [`QK_K`]),
    /// in either row order.
    pub fn is_kquant(self) -> bool {
        matches!(self.row_major(), Encoding::Q4K | Encoding::Q5K | Encoding::Q6K | Encoding::Q3K | Encoding::Q2K)
    }
    /// Values one block holds: 1 for the float encodings, [`QK_K`] (256)
    /// for the k-quants, [`GROUP`] (32) for the others. A row's length must
    /// be a multiple of it.
    pub fn block_values(self) -> usize {
        match self {
            Encoding::F32 | Encoding::F16 => 1,
            _ if self.is_kquant() => QK_K,
            _ => GROUP,
        }
    }
    /// Rows stored together: [`INTERLEAVE`] for the interleaved encodings
    /// (eight for [`Encoding::Q4KX8`]), else 1.
    pub fn rows_interleaved(self) -> usize {
        match self {
            Encoding::Q4KX8 => MAX_ROWS,
            Encoding::Q8X4
            | Encoding::Q4X4
            | Encoding::Q4SX4
            | Encoding::Q4KX4
            | Encoding::Q6KX4
            | Encoding::Q3KX4
            | Encoding::Q5KX4
            | Encoding::Q5SX4
            | Encoding::Q5X4
            | Encoding::Q4BX4 => INTERLEAVE,
            Encoding::Q2KX4 => INTERLEAVE,
            _ => 1,
        }
    }
    /// Whether each input channel's values are stored contiguously ([`to_channel_major`]).
    pub fn is_channel_major(self) -> bool {
        matches!(self, Encoding::Q8C | Encoding::Q4C)
    }
    /// The row count of a matrix in this encoding must be a multiple of
    /// this: [`INTERLEAVE`] for the interleaved encodings, [`CHANNEL_TILE`]
    /// for the channel-major ones, else 1.
    pub fn row_multiple(self) -> usize {
        if self.is_channel_major() {
            CHANNEL_TILE
        } else {
            self.rows_interleaved()
        }
    }
    /// The row-major encoding of the same blocks (itself if it is one).
    pub fn row_major(self) -> Encoding {
        match self {
            Encoding::Q8X4 | Encoding::Q8C => Encoding::Q8,
            Encoding::Q4X4 | Encoding::Q4C => Encoding::Q4,
            Encoding::Q4SX4 => Encoding::Q4S,
            Encoding::Q4KX4 | Encoding::Q4KX8 => Encoding::Q4K,
            Encoding::Q6KX4 => Encoding::Q6K,
            Encoding::Q3KX4 => Encoding::Q3K,
            Encoding::Q5KX4 => Encoding::Q5K,
            Encoding::Q5SX4 => Encoding::Q5S,
            Encoding::Q5X4 => Encoding::Q5,
            Encoding::Q2KX4 => Encoding::Q2K,
            Encoding::Q4BX4 => Encoding::Q4B,
            other => other,
        }
    }
    /// The channel-major form of these blocks, if there is one (Q8 and Q4,
    /// in either row order).
    pub fn channel_major(self) -> Option<Encoding> {
        match self.row_major() {
            Encoding::Q8 => Some(Encoding::Q8C),
            Encoding::Q4 => Some(Encoding::Q4C),
            _ => None,
        }
    }
    /// The interleaved form of a row-major quantized encoding for a matrix
    /// of `rows` rows: [`Encoding::Q4KX8`] for Q4_K when the rows are whole
    /// groups of eight, else [`Encoding::interleaved`]'s four-row form when
    /// they are whole groups of four.
    pub fn interleaved_for(self, rows: usize) -> Option<Encoding> {
        match self.interleaved()? {
            Encoding::Q4KX4 if rows.is_multiple_of(MAX_ROWS) => Some(Encoding::Q4KX8),
            four if rows.is_multiple_of(INTERLEAVE) => Some(four),
            _ => None,
        }
    }
    /// The four-row interleaved form of a row-major quantized encoding.
    pub fn interleaved(self) -> Option<Encoding> {
        match self {
            Encoding::Q8 => Some(Encoding::Q8X4),
            Encoding::Q4 => Some(Encoding::Q4X4),
            Encoding::Q4S => Some(Encoding::Q4SX4),
            Encoding::Q4K => Some(Encoding::Q4KX4),
            Encoding::Q6K => Some(Encoding::Q6KX4),
            Encoding::Q3K => Some(Encoding::Q3KX4),
            Encoding::Q5K => Some(Encoding::Q5KX4),
            Encoding::Q5S => Some(Encoding::Q5SX4),
            Encoding::Q5 => Some(Encoding::Q5X4),
            Encoding::Q2K => Some(Encoding::Q2KX4),
            Encoding::Q4B => Some(Encoding::Q4BX4),
            _ => None,
        }
    }
    /// Bytes taken by the blocks of `n` values (`n` a multiple of
    /// [`Encoding::block_values`]); a tensor also holds
    /// [`Encoding::row_scale_bytes`] ([`Encoding::tensor_bytes`]).
    pub fn bytes_for(self, n: usize) -> usize {
        match self {
            Encoding::Q4B => n / GROUP * std::mem::size_of::<BlockQ4B>(),
            Encoding::Q4K => n / QK_K * std::mem::size_of::<BlockQ4K>(),
            Encoding::Q5K => n / QK_K * std::mem::size_of::<BlockQ5K>(),
            Encoding::Q6K => n / QK_K * std::mem::size_of::<BlockQ6K>(),
            Encoding::Q3K => n / QK_K * std::mem::size_of::<BlockQ3K>(),
            Encoding::Q2K => n / QK_K * std::mem::size_of::<BlockQ2K>(),
            Encoding::F32 => n * 4,
            Encoding::F16 => n * 2,
            Encoding::Q8 => n / GROUP * std::mem::size_of::<BlockQ8>(),
            Encoding::Q4 => n / GROUP * std::mem::size_of::<BlockQ4>(),
            Encoding::Q4S => n / GROUP * std::mem::size_of::<BlockQ4S>(),
            Encoding::Q5S => n / GROUP * std::mem::size_of::<BlockQ5S>(),
            Encoding::Q5 => n / GROUP * std::mem::size_of::<BlockQ5>(),
            // The same bytes as the row-major blocks, rearranged.
            Encoding::Q8X4
            | Encoding::Q4X4
            | Encoding::Q4SX4
            | Encoding::Q8C
            | Encoding::Q4C
            | Encoding::Q4KX4
            | Encoding::Q6KX4
            | Encoding::Q3KX4
            | Encoding::Q5KX4
            | Encoding::Q5SX4
            | Encoding::Q5X4 => self.row_major().bytes_for(n),
            Encoding::Q2KX4 | Encoding::Q4BX4 | Encoding::Q4KX8 => self.row_major().bytes_for(n),
        }
    }
    /// Bytes of the per-row scales a tensor of `rows` rows stores before its
    /// blocks: one f32 a row for [`Encoding::Q4B`] (either order), else none.
    pub fn row_scale_bytes(self, rows: usize) -> usize {
        match self.row_major() {
            Encoding::Q4B => 4 * rows,
            _ => 0,
        }
    }
    /// Bytes of a whole tensor of `rows × cols` values: its row scales, then its blocks.
    pub fn tensor_bytes(self, rows: usize, cols: usize) -> usize {
        self.row_scale_bytes(rows) + self.bytes_for(rows * cols)
    }
}

/// Rows an interleaved block holds (but [`BlockQ4Kx8`]'s eight).
pub const INTERLEAVE: usize = 4;

/// The most rows any interleaved block holds ([`BlockQ4Kx8`]).
pub const MAX_ROWS: usize = 8;

/// int8 weights: value `j` is `d · q[j]`. ggml's Q8_0.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Pod, Zeroable)]
pub struct BlockQ8 {
    /// Scale.
    pub d: f16,
    /// Quantized values.
    pub qs: [i8; GROUP],
}
const _: () = assert!(std::mem::size_of::<BlockQ8>() == 34);

/// Asymmetric 4-bit weights: value `j` is `d · n + m`, with `n` the low nibble of
/// `qs[j]` for `j < 16` and the high nibble of `qs[j - 16]` otherwise. ggml's Q4_1.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Pod, Zeroable)]
pub struct BlockQ4 {
    /// Scale.
    pub d: f16,
    /// Minimum (the value of nibble 0).
    pub m: f16,
    /// Packed nibbles.
    pub qs: [u8; GROUP / 2],
}
const _: () = assert!(std::mem::size_of::<BlockQ4>() == 20);

/// Symmetric 4-bit weights: value `j` is `d · (n − 8)`, nibbles as in [`BlockQ4`]. ggml's Q4_0.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Pod, Zeroable)]
pub struct BlockQ4S {
    /// Scale.
    pub d: f16,
    /// Packed nibbles.
    pub qs: [u8; GROUP / 2],
}
const _: () = assert!(std::mem::size_of::<BlockQ4S>() == 18);

/// Four rows' blocks at one column range, rearranged for the kernels
/// (`models/FORMAT.md`, layout version 2): the rows' scales (and minimums)
/// side by side, then their values four bytes at a time — bytes `4c .. 4c+4`
/// of row `r` at `16c + 4r` — so that sixteen bytes are four rows' values
/// at the same four columns, which is what one `sdot` by lane multiplies.
/// The k-quants' packed sub-block scales are interleaved a byte at a time
/// ([`BlockQ4Kx4`]), so that they unpack for four rows at once.
pub trait Interleaved: Pod {
    /// The row-major block.
    type Row: Pod;
    /// Rows a block holds: [`INTERLEAVE`], or eight ([`BlockQ4Kx8`]).
    const ROWS: usize = INTERLEAVE;
    /// Interleaves [`Interleaved::ROWS`] rows' blocks (panics on another count).
    fn from_rows(rows: &[Self::Row]) -> Self;
    /// Row `r`'s block, as it was.
    fn row(&self, r: usize) -> Self::Row;
}

/// Moves the `N` bytes of each row, four at a time, between row-major order
/// (`rows[r][4c + j]`) and interleaved order (`mixed[16c + 4r + j]`).
#[inline(always)]
fn spread<const N: usize>(rows: [&[u8; N]; INTERLEAVE], mixed: &mut [u8]) {
    spread_by::<N, 4>(rows, mixed)
}

/// Row `r`'s `N` bytes out of interleaved order (the inverse of [`spread`]).
#[inline(always)]
fn gather<const N: usize>(mixed: &[u8], r: usize) -> [u8; N] {
    gather_by::<N, 4>(mixed, r)
}

/// [`spread`] `W` bytes at a time: `rows[r][W·c + j]` to `mixed[4W·c + W·r + j]`.
#[inline(always)]
fn spread_by<const N: usize, const W: usize>(rows: [&[u8; N]; INTERLEAVE], mixed: &mut [u8]) {
    for c in 0..N / W {
        for (r, row) in rows.iter().enumerate() {
            let at = INTERLEAVE * W * c + W * r;
            mixed[at..at + W].copy_from_slice(&row[W * c..W * c + W]);
        }
    }
}

/// The inverse of [`spread_by`] for row `r`.
#[inline(always)]
fn gather_by<const N: usize, const W: usize>(mixed: &[u8], r: usize) -> [u8; N] {
    let mut row = [0u8; N];
    for (c, piece) in row.chunks_exact_mut(W).enumerate() {
        let at = INTERLEAVE * W * c + W * r;
        piece.copy_from_slice(&mixed[at..at + W]);
    }
    row
}

/// [`BlockQ8`] × 4 rows. 136 bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Pod, Zeroable)]
pub struct BlockQ8x4 {
    /// Each row's scale.
    pub d: [f16; INTERLEAVE],
    /// Values, interleaved four bytes at a time.
    pub qs: [i8; INTERLEAVE * GROUP],
}
const _: () = assert!(std::mem::size_of::<BlockQ8x4>() == 4 * 34);

impl Interleaved for BlockQ8x4 {
    type Row = BlockQ8;
    fn from_rows(rows: &[BlockQ8]) -> Self {
        let rows: &[BlockQ8; INTERLEAVE] = rows.try_into().expect("four rows");
        let mut block = Self { d: rows.map(|b| b.d), qs: [0; INTERLEAVE * GROUP] };
        spread(
            rows.each_ref().map(|b| bytemuck::cast_ref::<_, [u8; GROUP]>(&b.qs)),
            bytemuck::cast_slice_mut(&mut block.qs),
        );
        block
    }
    #[inline(always)]
    fn row(&self, r: usize) -> BlockQ8 {
        BlockQ8 { d: self.d[r], qs: bytemuck::cast(gather::<GROUP>(bytemuck::cast_slice(&self.qs), r)) }
    }
}

/// [`BlockQ4`] × 4 rows. 80 bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Pod, Zeroable)]
pub struct BlockQ4x4 {
    /// Each row's scale.
    pub d: [f16; INTERLEAVE],
    /// Each row's minimum.
    pub m: [f16; INTERLEAVE],
    /// Packed nibbles, interleaved four bytes at a time.
    pub qs: [u8; INTERLEAVE * GROUP / 2],
}
const _: () = assert!(std::mem::size_of::<BlockQ4x4>() == 4 * 20);

impl Interleaved for BlockQ4x4 {
    type Row = BlockQ4;
    fn from_rows(rows: &[BlockQ4]) -> Self {
        let rows: &[BlockQ4; INTERLEAVE] = rows.try_into().expect("four rows");
        let mut block = Self { d: rows.map(|b| b.d), m: rows.map(|b| b.m), qs: [0; INTERLEAVE * GROUP / 2] };
        spread(rows.each_ref().map(|b| &b.qs), &mut block.qs);
        block
    }
    #[inline(always)]
    fn row(&self, r: usize) -> BlockQ4 {
        BlockQ4 { d: self.d[r], m: self.m[r], qs: gather(&self.qs, r) }
    }
}

/// [`BlockQ4S`] × 4 rows. 72 bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Pod, Zeroable)]
pub struct BlockQ4Sx4 {
    /// Each row's scale.
    pub d: [f16; INTERLEAVE],
    /// Packed nibbles, interleaved four bytes at a time.
    pub qs: [u8; INTERLEAVE * GROUP / 2],
}
const _: () = assert!(std::mem::size_of::<BlockQ4Sx4>() == 4 * 18);

impl Interleaved for BlockQ4Sx4 {
    type Row = BlockQ4S;
    fn from_rows(rows: &[BlockQ4S]) -> Self {
        let rows: &[BlockQ4S; INTERLEAVE] = rows.try_into().expect("four rows");
        let mut block = Self { d: rows.map(|b| b.d), qs: [0; INTERLEAVE * GROUP / 2] };
        spread(rows.each_ref().map(|b| &b.qs), &mut block.qs);
        block
    }
    #[inline(always)]
    fn row(&self, r: usize) -> BlockQ4S {
        BlockQ4S { d: self.d[r], qs: gather(&self.qs, r) }
    }
}

/// 4-bit weights under a row scale: value `j` is `a · (d · (n − 7.5) + 16 · o)`,
/// `a` the row's f32 scale (stored before the tensor's blocks), `n` the
/// nibble as in [`BlockQ4`]. The levels are Q4_1's (Q4_1's scale and
/// minimum are `a·d` and `a·(16·o − 7.5·d)`; `16a·o` is the block's
/// midpoint), with the block's scale and offset in a byte each instead of
/// two f16s: 18 bytes a block against Q4_1's 20. The kernels add
/// `d · dₓ · Σ n·q + (16·o − 7.5·d) · s` over a row's blocks, the Q4 sum
/// with a small integer scale and a half-integer minimum, and multiply the
/// row's total by `a` once.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Pod, Zeroable)]
pub struct BlockQ4B {
    /// Scale, in units of the row scale.
    pub d: u8,
    /// Offset (the block's midpoint), in units of 16 row scales.
    pub o: i8,
    /// Packed nibbles.
    pub qs: [u8; GROUP / 2],
}
const _: () = assert!(std::mem::size_of::<BlockQ4B>() == 18);

impl BlockQ4B {
    /// The block's Q4 scale and minimum in units of its row scale: `(d, 16o − 7.5d)`
    /// (exact in f32, and computed as the kernels compute them).
    #[inline(always)]
    pub fn scale_and_minimum(&self) -> (f32, f32) {
        let d = self.d as f32;
        (d, (16 * self.o as i32) as f32 - d * 7.5)
    }
}

/// [`BlockQ4B`] × 4 rows. 72 bytes: the four rows' scales, their offsets,
/// then the nibbles interleaved four bytes at a time as in [`BlockQ4x4`]
/// (one 8-byte load gives the kernels all eight scale bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Pod, Zeroable)]
pub struct BlockQ4Bx4 {
    /// Each row's scale.
    pub d: [u8; INTERLEAVE],
    /// Each row's offset.
    pub o: [i8; INTERLEAVE],
    /// Packed nibbles, interleaved four bytes at a time.
    pub qs: [u8; INTERLEAVE * GROUP / 2],
}
const _: () = assert!(std::mem::size_of::<BlockQ4Bx4>() == 4 * 18);

impl Interleaved for BlockQ4Bx4 {
    type Row = BlockQ4B;
    fn from_rows(rows: &[BlockQ4B]) -> Self {
        let rows: &[BlockQ4B; INTERLEAVE] = rows.try_into().expect("four rows");
        let mut block = Self { d: rows.map(|b| b.d), o: rows.map(|b| b.o), qs: [0; INTERLEAVE * GROUP / 2] };
        spread(rows.each_ref().map(|b| &b.qs), &mut block.qs);
        block
    }
    #[inline(always)]
    fn row(&self, r: usize) -> BlockQ4B {
        BlockQ4B { d: self.d[r], o: self.o[r], qs: gather(&self.qs, r) }
    }
}

/// Symmetric 5-bit weights: value `j` is `d · (n − 16)`, with `n`'s low
/// four bits the nibble of `qs` as in [`BlockQ4`] (low nibble of `qs[j]` for
/// `j < 16`, high nibble of `qs[j − 16]` otherwise) and its fifth bit bit
/// `j` of `qh` read as a little-endian `u32`. ggml's Q5_0, byte for byte.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Pod, Zeroable)]
pub struct BlockQ5S {
    /// Scale.
    pub d: f16,
    /// Fifth bits: value `j`'s in bit `j % 8` of byte `j / 8`.
    pub qh: [u8; 4],
    /// Packed low nibbles.
    pub qs: [u8; GROUP / 2],
}
const _: () = assert!(std::mem::size_of::<BlockQ5S>() == 22);

/// Level `n` (0..=31) of value `j` of a ggml 5-bit block (Q5_0 and Q5_1
/// alike): the nibble of `qs` as in [`BlockQ4`] with bit `j` of `qh` (a
/// little-endian `u32`) on top.
#[inline(always)]
fn five_bit_level(qh: [u8; 4], qs: &[u8; GROUP / 2], j: usize) -> u8 {
    let low = if j < GROUP / 2 { qs[j] & 0xF } else { qs[j - GROUP / 2] >> 4 };
    let high = (u32::from_le_bytes(qh) >> j) & 1;
    low | (high as u8) << 4
}

/// Levels `n` (their low five bits; value `j`'s at `j`) packed as ggml's
/// 5-bit blocks hold them: `(qh, qs)`, the inverse of [`five_bit_level`].
fn pack_five_bit_levels(n: &[u8; GROUP]) -> ([u8; 4], [u8; GROUP / 2]) {
    let mut qs = [0u8; GROUP / 2];
    let mut high = 0u32;
    for j in 0..GROUP / 2 {
        let (lo, hi) = (n[j], n[j + GROUP / 2]);
        qs[j] = (lo & 0xF) | (hi & 0xF) << 4;
        high |= (((lo >> 4) & 1) as u32) << j | (((hi >> 4) & 1) as u32) << (j + GROUP / 2);
    }
    (high.to_le_bytes(), qs)
}

impl BlockQ5S {
    /// Value `j`'s level `n` (0..=31; the value is `d · (n − 16)`).
    #[inline(always)]
    pub fn level(&self, j: usize) -> u8 {
        five_bit_level(self.qh, &self.qs, j)
    }

    /// The block of scale `d` and levels `n` (0..=31, value `j`'s at `j`):
    /// the inverse of [`BlockQ5S::level`].
    pub fn from_levels(d: f16, n: &[u8; GROUP]) -> Self {
        let (qh, qs) = pack_five_bit_levels(n);
        BlockQ5S { d, qh, qs }
    }
}

/// Asymmetric 5-bit weights: value `j` is `d · n + m`, with `n` (0..=31)
/// as in [`BlockQ5S`]: the nibble of `qs` with bit `j` of `qh` on top.
/// ggml's Q5_1, byte for byte.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Pod, Zeroable)]
pub struct BlockQ5 {
    /// Scale.
    pub d: f16,
    /// Minimum (the value of level 0).
    pub m: f16,
    /// Fifth bits: value `j`'s in bit `j % 8` of byte `j / 8`.
    pub qh: [u8; 4],
    /// Packed low nibbles.
    pub qs: [u8; GROUP / 2],
}
const _: () = assert!(std::mem::size_of::<BlockQ5>() == 24);

impl BlockQ5 {
    /// Value `j`'s level `n` (0..=31; the value is `d · n + m`).
    #[inline(always)]
    pub fn level(&self, j: usize) -> u8 {
        five_bit_level(self.qh, &self.qs, j)
    }

    /// The block of scale `d`, minimum `m` and levels `n` (their low five
    /// bits, value `j`'s at `j`): the inverse of [`BlockQ5::level`].
    pub fn from_levels(d: f16, m: f16, n: &[u8; GROUP]) -> Self {
        let (qh, qs) = pack_five_bit_levels(n);
        BlockQ5 { d, m, qh, qs }
    }
}

/// [`BlockQ5S`] × 4 rows. 88 bytes, laid out for the kernels (`models/FORMAT.md`):
///
/// - `d`: the four rows' scales side by side;
/// - `qh`: the rows' fifth bits transposed and flipped, so that one
///   comparison of the 16 bytes against one bit gives a whole column
///   group's mask: byte `4r + j`, bit `c` is `1 − h`, `h` the fifth bit of
///   row `r`'s value `4c + j` (`c` = 0..8). Byte `4r + j` of this is thus
///   aligned with byte `4r + j` of each column group's sixteen value bytes
///   below. Flipped, the bit says whether the signed level `n − 16` is
///   negative: `n − 16` is the nibble alone (bit 0) or the nibble with
///   `0xF0` on top (bit 1, read as `i8`), so the kernels build the signed
///   5-bit value with a mask and one bitwise insert, no subtraction;
/// - `qs`: the nibbles interleaved four bytes at a time as [`spread`] does
///   (bytes `4c .. 4c+4` of row `r` at `16c + 4r`): vector `c` of 16 bytes
///   holds column group `c` (columns `4c .. 4c+4`) in its low nibbles and
///   column group `c + 4` in its high ones, for the four rows.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Pod, Zeroable)]
pub struct BlockQ5Sx4 {
    /// Each row's scale.
    pub d: [f16; INTERLEAVE],
    /// The rows' fifth bits, transposed to `[row][column in group]` bytes of
    /// one bit a column group, flipped.
    pub qh: [u8; INTERLEAVE * 4],
    /// Packed nibbles, interleaved four bytes at a time.
    pub qs: [u8; INTERLEAVE * GROUP / 2],
}
const _: () = assert!(std::mem::size_of::<BlockQ5Sx4>() == 4 * 22);

/// A 5-bit row block's 32 fifth bits as [`BlockQ5Sx4::qh`] and
/// [`BlockQ5x4::qh`] store them: byte `j`, bit `c` is `1 −` bit `4c + j` of `qh`.
#[inline(always)]
fn transpose_high_bits(qh: [u8; 4]) -> [u8; 4] {
    let bits = !u32::from_le_bytes(qh);
    std::array::from_fn(|j| (0..8).fold(0u8, |byte, c| byte | (((bits >> (4 * c + j)) & 1) as u8) << c))
}

/// The inverse of [`transpose_high_bits`].
#[inline(always)]
fn untranspose_high_bits(bytes: [u8; 4]) -> [u8; 4] {
    let mut bits = 0u32;
    for (j, byte) in bytes.into_iter().enumerate() {
        for c in 0..8 {
            bits |= (((byte >> c) & 1) as u32) << (4 * c + j);
        }
    }
    (!bits).to_le_bytes()
}

/// Four rows' fifth bits and nibbles as the interleaved 5-bit blocks hold
/// them: each row's bits [`transpose_high_bits`]ed into its four bytes of
/// `qh`, the nibbles [`spread`].
fn interleave_five_bits(
    rows: [([u8; 4], &[u8; GROUP / 2]); INTERLEAVE],
) -> ([u8; INTERLEAVE * 4], [u8; INTERLEAVE * GROUP / 2]) {
    let (mut qh, mut qs) = ([0u8; INTERLEAVE * 4], [0u8; INTERLEAVE * GROUP / 2]);
    for (r, (bits, _)) in rows.iter().enumerate() {
        qh[4 * r..4 * r + 4].copy_from_slice(&transpose_high_bits(*bits));
    }
    spread(rows.map(|(_, nibbles)| nibbles), &mut qs);
    (qh, qs)
}

/// Row `r`'s fifth bits and nibbles back in ggml's order (the inverse of
/// [`interleave_five_bits`]).
#[inline(always)]
fn row_five_bits(qh: &[u8; INTERLEAVE * 4], qs: &[u8; INTERLEAVE * GROUP / 2], r: usize) -> ([u8; 4], [u8; GROUP / 2]) {
    let transposed = [qh[4 * r], qh[4 * r + 1], qh[4 * r + 2], qh[4 * r + 3]];
    (untranspose_high_bits(transposed), gather(qs, r))
}

impl Interleaved for BlockQ5Sx4 {
    type Row = BlockQ5S;
    fn from_rows(rows: &[BlockQ5S]) -> Self {
        let rows: &[BlockQ5S; INTERLEAVE] = rows.try_into().expect("four rows");
        let (qh, qs) = interleave_five_bits(rows.each_ref().map(|b| (b.qh, &b.qs)));
        Self { d: rows.map(|b| b.d), qh, qs }
    }
    #[inline(always)]
    fn row(&self, r: usize) -> BlockQ5S {
        let (qh, qs) = row_five_bits(&self.qh, &self.qs, r);
        BlockQ5S { d: self.d[r], qh, qs }
    }
}

/// [`BlockQ5`] × 4 rows. 96 bytes, laid out as [`BlockQ5Sx4`] with the
/// four rows' minimums after their scales (`models/FORMAT.md`):
///
/// - `d`, `m`: the four rows' scales, then their minimums (one 16-byte
///   load, two conversions give both as four lanes);
/// - `qh`: the fifth bits transposed and flipped exactly as
///   [`BlockQ5Sx4::qh`], so the kernels build the same signed levels
///   `n − 16` (the minimum then enters as `m + 16·d`);
/// - `qs`: the nibbles interleaved four bytes at a time ([`spread`]).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Pod, Zeroable)]
pub struct BlockQ5x4 {
    /// Each row's scale.
    pub d: [f16; INTERLEAVE],
    /// Each row's minimum.
    pub m: [f16; INTERLEAVE],
    /// The rows' fifth bits, transposed to `[row][column in group]` bytes of
    /// one bit a column group, flipped.
    pub qh: [u8; INTERLEAVE * 4],
    /// Packed nibbles, interleaved four bytes at a time.
    pub qs: [u8; INTERLEAVE * GROUP / 2],
}
const _: () = assert!(std::mem::size_of::<BlockQ5x4>() == 4 * 24);

impl Interleaved for BlockQ5x4 {
    type Row = BlockQ5;
    fn from_rows(rows: &[BlockQ5]) -> Self {
        let rows: &[BlockQ5; INTERLEAVE] = rows.try_into().expect("four rows");
        let (qh, qs) = interleave_five_bits(rows.each_ref().map(|b| (b.qh, &b.qs)));
        Self { d: rows.map(|b| b.d), m: rows.map(|b| b.m), qh, qs }
    }
    #[inline(always)]
    fn row(&self, r: usize) -> BlockQ5 {
        let (qh, qs) = row_five_bits(&self.qh, &self.qs, r);
        BlockQ5 { d: self.d[r], m: self.m[r], qh, qs }
    }
}

/// [`BlockQ4K`] × 4 rows: 576 bytes, read front to back by the kernels
/// (`crate::kernels::matmul::kquant::interleaved`).
///
/// - `d`, `dmin`: the four rows' f16 units side by side (one 16-byte load,
///   two conversions give both as four lanes);
/// - `scales`: the rows' 12 packed scale bytes interleaved one byte at a
///   time, byte `i` of row `r` at `4i + r`. ggml's unpacking of the 6-bit
///   scales and minimums works on each byte position alone (masks and
///   shifts of bytes `i`, `i + 4`, `i + 8`), so the three 16-byte vectors
///   unpack with the same few vector operations into all four rows' values,
///   already in `[sub-block][row]` order: a vector's lanes are four rows.
/// - `qs`: the nibbles interleaved four bytes at a time as [`spread`] does
///   (bytes `4c .. 4c+4` of row `r` at `16c + 4r`): sixteen bytes are four
///   rows' nibbles at four columns, what one `sdot` by lane multiplies;
///   bytes `128k .. 128k+128` hold the four rows' sub-blocks `2k` (low
///   nibbles) and `2k + 1` (high nibbles).
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockQ4Kx4 {
    /// Each row's f16 scale unit, little-endian.
    pub d: [[u8; 2]; INTERLEAVE],
    /// Each row's f16 minimum unit, little-endian.
    pub dmin: [[u8; 2]; INTERLEAVE],
    /// The rows' packed 6-bit scales and minimums, interleaved a byte at a time.
    pub scales: [u8; INTERLEAVE * 12],
    /// The rows' nibbles, interleaved four bytes at a time.
    pub qs: [u8; INTERLEAVE * QK_K / 2],
}
const _: () = assert!(std::mem::size_of::<BlockQ4Kx4>() == 4 * 144);

impl Interleaved for BlockQ4Kx4 {
    type Row = BlockQ4K;
    fn from_rows(rows: &[BlockQ4K]) -> Self {
        let rows: &[BlockQ4K; INTERLEAVE] = rows.try_into().expect("four rows");
        let mut block = Self {
            d: rows.map(|b| b.d),
            dmin: rows.map(|b| b.dmin),
            scales: [0; INTERLEAVE * 12],
            qs: [0; INTERLEAVE * QK_K / 2],
        };
        spread_by::<12, 1>(rows.each_ref().map(|b| &b.scales), &mut block.scales);
        spread(rows.each_ref().map(|b| &b.qs), &mut block.qs);
        block
    }
    #[inline(always)]
    fn row(&self, r: usize) -> BlockQ4K {
        BlockQ4K {
            d: self.d[r],
            dmin: self.dmin[r],
            scales: gather_by::<12, 1>(&self.scales, r),
            qs: gather(&self.qs, r),
        }
    }
}

/// [`BlockQ4K`] × 8 rows: 1152 bytes, for kernels that multiply a byte's
/// two nibbles by the same activation value.
///
/// - `heads`: rows 0–3's and rows 4–7's units and packed scales, each as
///   the first 64 bytes of a [`BlockQ4Kx4`] of those rows (`d`, `dmin`,
///   `scales`);
/// - `qs`: sub-block `j`'s 32 columns at bytes `128j ..`, sixteen bytes a
///   group `c` of four columns (`128j + 16c ..`): byte `4r + i` holds row
///   `r`'s level at column `32j + 4c + i` in its low nibble and row
///   `r + 4`'s, XOR 8, in its high nibble.
///
/// Read as `i8`, such a byte is `l + 16·(h − 8)` (the high nibble's flipped
/// top bit makes it the signed `h − 8`), so `sdot` of the raw bytes gives
/// `Σ l·q + 16·Σ (h − 8)·q` and of the masked low nibbles `Σ l·q`: rows
/// 4–7 cost no unpacking, and their `8·Σq` comes back through the
/// activation's integer sums as the minimums do. Sixteen bytes are still
/// four rows' values at four columns for rows 0–3, and four rows' at the
/// same columns for rows 4–7.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockQ4Kx8 {
    /// Rows 0–3's and rows 4–7's units and packed scales, as [`BlockQ4Kx4`]'s.
    pub heads: [[u8; Q4K_HEAD]; 2],
    /// The levels, a sub-block of eight rows at a time.
    pub qs: [u8; MAX_ROWS * QK_K / 2],
}
const _: () = assert!(std::mem::size_of::<BlockQ4Kx8>() == 8 * 144);

/// Bytes of a [`BlockQ4Kx4`]'s units and packed scales: a [`BlockQ4Kx8`]'s head.
pub const Q4K_HEAD: usize = std::mem::offset_of!(BlockQ4Kx4, qs);

/// Row `r`'s Q4_K level at column `col` (0..256).
fn q4k_level(block: &BlockQ4K, col: usize) -> u8 {
    let (sub, l) = (col / GROUP, col % GROUP);
    (block.qs[32 * (sub / 2) + l] >> (4 * (sub % 2))) & 0xF
}

/// Where column `col` of row `r % 4` is in a [`BlockQ4Kx8`]'s `qs`.
fn q4kx8_at(r: usize, col: usize) -> usize {
    let (j, c, i) = (col / GROUP, (col % GROUP) / 4, col % 4);
    128 * j + 16 * c + 4 * (r % 4) + i
}

impl Interleaved for BlockQ4Kx8 {
    type Row = BlockQ4K;
    const ROWS: usize = MAX_ROWS;
    fn from_rows(rows: &[BlockQ4K]) -> Self {
        let rows: &[BlockQ4K; MAX_ROWS] = rows.try_into().expect("eight rows");
        let mut block = Self::zeroed();
        for (head, four) in block.heads.iter_mut().zip(rows.chunks_exact(INTERLEAVE)) {
            let x4 = BlockQ4Kx4::from_rows(four);
            head.copy_from_slice(&bytemuck::bytes_of(&x4)[..Q4K_HEAD]);
        }
        for col in 0..QK_K {
            for r in 0..INTERLEAVE {
                let (low, high) = (q4k_level(&rows[r], col), q4k_level(&rows[r + INTERLEAVE], col));
                block.qs[q4kx8_at(r, col)] = low | ((high ^ 8) << 4);
            }
        }
        block
    }
    fn row(&self, r: usize) -> BlockQ4K {
        let head = &self.heads[r / INTERLEAVE];
        let mut x4 = BlockQ4Kx4::zeroed();
        bytemuck::bytes_of_mut(&mut x4)[..Q4K_HEAD].copy_from_slice(head);
        let mut block = x4.row(r % INTERLEAVE);
        for col in 0..QK_K {
            let byte = self.qs[q4kx8_at(r, col)];
            let level = if r < INTERLEAVE { byte & 0xF } else { (byte >> 4) ^ 8 };
            let (sub, l) = (col / GROUP, col % GROUP);
            block.qs[32 * (sub / 2) + l] |= level << (4 * (sub % 2));
        }
        block
    }
}

/// [`BlockQ6K`] × 4 rows: 840 bytes, laid out as [`BlockQ4Kx4`]:
///
/// - `d`: the four rows' f16 units side by side;
/// - `scales`: the rows' sixteen signed 8-bit scales interleaved a byte at a
///   time (scale `i` of row `r` at `4i + r`), so a 16-byte vector is four
///   sub-blocks' scales of the four rows, `[sub-block][row]`;
/// - `ql`, `qh`: the low nibbles and the high two bits, each interleaved four
///   bytes at a time as [`spread`] does; bytes `4l .. 4l+4` of a row's `ql`
///   and of its `qh` land at the same offsets of their interleaved arrays, so
///   a level's two parts are unpacked from matching vectors.
/// - `qh` is stored XOR [`Q6K_HIGH_FLIP`]: each two-bit field `t` as `t ^ 2`,
///   whose value as a signed two-bit number is `t − 2`. Put on top of a
///   level's nibble shifted up by two, the byte read as `i8` is then
///   `4·(level − 32)`: the kernels build the signed level with one insert
///   (`sli`/`sri`) and no subtraction of ggml's zero point 32.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockQ6Kx4 {
    /// Each row's f16 scale unit, little-endian.
    pub d: [[u8; 2]; INTERLEAVE],
    /// The rows' signed sub-block scales, interleaved a byte at a time.
    pub scales: [u8; INTERLEAVE * QK_K / 16],
    /// The rows' low four bits, interleaved four bytes at a time.
    pub ql: [u8; INTERLEAVE * QK_K / 2],
    /// The rows' high two bits, interleaved four bytes at a time.
    pub qh: [u8; INTERLEAVE * QK_K / 4],
}
const _: () = assert!(std::mem::size_of::<BlockQ6Kx4>() == 4 * 210);

/// What [`BlockQ6Kx4`] stores `qh` XOR: bit 1 of every two-bit field.
pub const Q6K_HIGH_FLIP: u8 = 0xAA;

impl Interleaved for BlockQ6Kx4 {
    type Row = BlockQ6K;
    fn from_rows(rows: &[BlockQ6K]) -> Self {
        let rows: &[BlockQ6K; INTERLEAVE] = rows.try_into().expect("four rows");
        let mut block = Self {
            d: rows.map(|b| b.d),
            scales: [0; INTERLEAVE * QK_K / 16],
            ql: [0; INTERLEAVE * QK_K / 2],
            qh: [0; INTERLEAVE * QK_K / 4],
        };
        spread_by::<16, 1>(rows.each_ref().map(|b| &b.scales), &mut block.scales);
        spread(rows.each_ref().map(|b| &b.ql), &mut block.ql);
        spread(rows.each_ref().map(|b| &b.qh), &mut block.qh);
        block.qh.iter_mut().for_each(|b| *b ^= Q6K_HIGH_FLIP);
        block
    }
    #[inline(always)]
    fn row(&self, r: usize) -> BlockQ6K {
        BlockQ6K {
            ql: gather(&self.ql, r),
            qh: gather(&self.qh, r).map(|b| b ^ Q6K_HIGH_FLIP),
            scales: gather_by::<16, 1>(&self.scales, r),
            d: self.d[r],
        }
    }
}

/// [`BlockQ3K`] × 4 rows: 440 bytes, its levels stored as three planes of
/// packed signed levels rather than ggml's `qs` and `hmask`, so that the
/// kernels get each level with one or two vector operations. The units come
/// last, as in ggml's block, so that the planes start 48 bytes in (a
/// multiple of 16: the kernels load them in pairs of vectors, `ldp`, from
/// the block's address).
///
/// - `scales`: the rows' 12 packed scale bytes interleaved a byte at a time
///   (byte `i` of row `r` at `4i + r`), as [`BlockQ4Kx4`]; bytes 8–11 (the
///   scales' high two bits) stored XOR [`Q3K_SCALE_FLIP`]: bit 5 of every
///   6-bit scale flipped, so that the 6-bit field read as a signed number is
///   ggml's `scale − 32`, with no subtraction;
/// - `planes`: value `32k + l` of a row (`k` = 0..8, `l` = 0..32) as its
///   level `q − 4·(1 − h)` (`q` its two bits in `qs`, `h` its `hmask` bit)
///   in three-bit two's complement, `t_k`; each row's column `l` holds
///   its eight `t_k` in three bytes ([`q3k_planes`]):
///   - plane 0: `t₀` in bits 5–7, `t₁` in bits 2–4, `t₆`'s low two bits in 0–1;
///   - plane 1: `t₂`, `t₃`, `t₇`'s low two bits, in the same places;
///   - plane 2: `t₄`, `t₅`, then `t₆`'s sign bit in bit 0 and `t₇`'s in bit 1.
///
///   Each plane's 32 bytes a row are interleaved four bytes at a time as
///   [`spread`] does (16 bytes: four rows at four columns). A field in
///   bits 5–7 is `32·t` once the bits below are cleared (one `and`, or `t`
///   itself after one arithmetic shift right by 5), one in bits 2–4 after a
///   shift left by 3 first; `t₆` is one insert (`sli`) of its sign bit
///   above its low two bits and a shift left by 5, `t₇` the same after a
///   shift right by 1 puts its sign bit in bit 0.
/// - `d`: the four rows' f16 units side by side.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockQ3Kx4 {
    /// The rows' packed 6-bit scales, interleaved a byte at a time, bytes 8–11 flipped.
    pub scales: [u8; INTERLEAVE * 12],
    /// The rows' three-bit signed levels in three planes, each interleaved four bytes at a time.
    pub planes: [[u8; INTERLEAVE * 32]; 3],
    /// Each row's f16 scale unit, little-endian.
    pub d: [[u8; 2]; INTERLEAVE],
}
const _: () = assert!(std::mem::size_of::<BlockQ3Kx4>() == 4 * 110);

/// What [`BlockQ3Kx4`] stores bytes 8–11 of each row's `scales` XOR: the
/// top bit of every two-bit field (bit 5 of each 6-bit scale).
pub const Q3K_SCALE_FLIP: u8 = 0xAA;

/// Where [`BlockQ3Kx4`]'s planes keep value `32k + l`'s three-bit level:
/// `(plane, shift)` of its field for `k` = 0..6 (whole), and for `k` = 6, 7
/// its low two bits at `(plane, 0)` and its sign at bit `k − 6` of plane 2.
const Q3K_FIELDS: [(usize, u32); 8] = [(0, 5), (0, 2), (1, 5), (1, 2), (2, 5), (2, 2), (0, 0), (1, 0)];

/// A row's Q3_K super-block as [`BlockQ3Kx4`]'s three planes, row-major:
/// column `l`'s byte of each at `l`.
pub fn q3k_planes(block: &BlockQ3K) -> [[u8; 32]; 3] {
    let mut planes = [[0u8; 32]; 3];
    for (l, &high_bits) in block.hmask.iter().enumerate() {
        for (k, &(plane, shift)) in Q3K_FIELDS.iter().enumerate() {
            let q = (block.qs[32 * (k / 4) + l] >> (2 * (k % 4))) & 3;
            let h = (high_bits >> k) & 1;
            // `q − 4·(1 − h)` in three-bit two's complement: the flipped high bit is the sign.
            let t = q | ((h ^ 1) << 2);
            if k < 6 {
                planes[plane][l] |= t << shift;
            } else {
                planes[plane][l] |= t & 3;
                planes[2][l] |= (t >> 2) << (k - 6);
            }
        }
    }
    planes
}

/// The inverse of [`q3k_planes`]: a row's `(hmask, qs)`.
fn q3k_from_planes(planes: &[[u8; 32]; 3]) -> ([u8; 32], [u8; 64]) {
    let (mut hmask, mut qs) = ([0u8; 32], [0u8; 64]);
    for (l, high_bits) in hmask.iter_mut().enumerate() {
        for (k, &(plane, shift)) in Q3K_FIELDS.iter().enumerate() {
            let t = if k < 6 {
                (planes[plane][l] >> shift) & 7
            } else {
                (planes[plane][l] & 3) | (((planes[2][l] >> (k - 6)) & 1) << 2)
            };
            qs[32 * (k / 4) + l] |= (t & 3) << (2 * (k % 4));
            *high_bits |= ((t >> 2) ^ 1) << k;
        }
    }
    (hmask, qs)
}

impl Interleaved for BlockQ3Kx4 {
    type Row = BlockQ3K;
    fn from_rows(rows: &[BlockQ3K]) -> Self {
        let rows: &[BlockQ3K; INTERLEAVE] = rows.try_into().expect("four rows");
        let mut block = Self { scales: [0; INTERLEAVE * 12], planes: [[0; INTERLEAVE * 32]; 3], d: rows.map(|b| b.d) };
        let scales = rows.map(|b| {
            let mut scales = b.scales;
            scales[8..].iter_mut().for_each(|s| *s ^= Q3K_SCALE_FLIP);
            scales
        });
        spread_by::<12, 1>(scales.each_ref(), &mut block.scales);
        let planes = rows.each_ref().map(q3k_planes);
        for (p, mixed) in block.planes.iter_mut().enumerate() {
            spread(planes.each_ref().map(|row| &row[p]), mixed);
        }
        block
    }
    #[inline(always)]
    fn row(&self, r: usize) -> BlockQ3K {
        let mut scales = gather_by::<12, 1>(&self.scales, r);
        scales[8..].iter_mut().for_each(|s| *s ^= Q3K_SCALE_FLIP);
        let (hmask, qs) = q3k_from_planes(&self.planes.each_ref().map(|p| gather(p, r)));
        BlockQ3K { hmask, qs, scales, d: self.d[r] }
    }
}

/// [`BlockQ5K`] × 4 rows: 704 bytes, laid out as [`BlockQ4Kx4`] with the
/// fifth bits between the scales and the nibbles:
///
/// - `d`, `dmin`, `scales`, `qs`: as [`BlockQ4Kx4`];
/// - `qh`: the rows' 32 bytes of fifth bits interleaved four bytes at a
///   time as [`spread`] does, so that the sixteen bytes at `16c` are the
///   fifth bits of the same four rows and four columns as the sixteen
///   nibble bytes at `128j + 16c` of `qs`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockQ5Kx4 {
    /// Each row's f16 scale unit, little-endian.
    pub d: [[u8; 2]; INTERLEAVE],
    /// Each row's f16 minimum unit, little-endian.
    pub dmin: [[u8; 2]; INTERLEAVE],
    /// The rows' packed 6-bit scales and minimums, interleaved a byte at a time.
    pub scales: [u8; INTERLEAVE * 12],
    /// The rows' fifth bits, interleaved four bytes at a time.
    pub qh: [u8; INTERLEAVE * QK_K / 8],
    /// The rows' low four bits, interleaved four bytes at a time.
    pub qs: [u8; INTERLEAVE * QK_K / 2],
}
const _: () = assert!(std::mem::size_of::<BlockQ5Kx4>() == 4 * 176);

impl Interleaved for BlockQ5Kx4 {
    type Row = BlockQ5K;
    fn from_rows(rows: &[BlockQ5K]) -> Self {
        let rows: &[BlockQ5K; INTERLEAVE] = rows.try_into().expect("four rows");
        let mut block = Self {
            d: rows.map(|b| b.d),
            dmin: rows.map(|b| b.dmin),
            scales: [0; INTERLEAVE * 12],
            qh: [0; INTERLEAVE * QK_K / 8],
            qs: [0; INTERLEAVE * QK_K / 2],
        };
        spread_by::<12, 1>(rows.each_ref().map(|b| &b.scales), &mut block.scales);
        spread(rows.each_ref().map(|b| &b.qh), &mut block.qh);
        spread(rows.each_ref().map(|b| &b.qs), &mut block.qs);
        block
    }
    #[inline(always)]
    fn row(&self, r: usize) -> BlockQ5K {
        BlockQ5K {
            d: self.d[r],
            dmin: self.dmin[r],
            scales: gather_by::<12, 1>(&self.scales, r),
            qh: gather(&self.qh, r),
            qs: gather(&self.qs, r),
        }
    }
}

/// [`BlockQ2K`] × 4 rows: 336 bytes, laid out as [`BlockQ4Kx4`]: ggml's
/// bytes moved, none changed.
///
/// - `d`, `dmin`: the four rows' f16 units side by side (one 16-byte load);
/// - `scales`: the rows' sixteen scale bytes (scale in the low nibble,
///   minimum in the high one) interleaved a byte at a time (byte `i` of row
///   `r` at `4i + r`), so a 16-byte vector is four sub-blocks' scales and
///   minimums of the four rows, `[sub-block][row]`;
/// - `qs`: the rows' 64 bytes interleaved four bytes at a time as [`spread`]
///   does. A row's byte `32n + l` holds the two-bit levels of values
///   `128n + 32j + l` (`j` = 0..4) at bits `2j`, so the 128 bytes at `128n`
///   are, for every `j`, the four rows' levels of activation block `4n + j`
///   at bits `2j`: one `and` (or a shift right for `j = 3`) a vector gives
///   `4^j` times the levels, which the kernels multiply as they are and put
///   right by scaling the sub-block scales (exactly: powers of two).
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockQ2Kx4 {
    /// Each row's f16 scale unit, little-endian.
    pub d: [[u8; 2]; INTERLEAVE],
    /// Each row's f16 minimum unit, little-endian.
    pub dmin: [[u8; 2]; INTERLEAVE],
    /// The rows' 4-bit scales and minimums, interleaved a byte at a time.
    pub scales: [u8; INTERLEAVE * QK_K / 16],
    /// The rows' two-bit levels, interleaved four bytes at a time.
    pub qs: [u8; INTERLEAVE * QK_K / 4],
}
const _: () = assert!(std::mem::size_of::<BlockQ2Kx4>() == 4 * 84);

impl Interleaved for BlockQ2Kx4 {
    type Row = BlockQ2K;
    fn from_rows(rows: &[BlockQ2K]) -> Self {
        let rows: &[BlockQ2K; INTERLEAVE] = rows.try_into().expect("four rows");
        let mut block = Self {
            d: rows.map(|b| b.d),
            dmin: rows.map(|b| b.dmin),
            scales: [0; INTERLEAVE * QK_K / 16],
            qs: [0; INTERLEAVE * QK_K / 4],
        };
        spread_by::<16, 1>(rows.each_ref().map(|b| &b.scales), &mut block.scales);
        spread(rows.each_ref().map(|b| &b.qs), &mut block.qs);
        block
    }
    #[inline(always)]
    fn row(&self, r: usize) -> BlockQ2K {
        BlockQ2K {
            scales: gather_by::<16, 1>(&self.scales, r),
            qs: gather(&self.qs, r),
            d: self.d[r],
            dmin: self.dmin[r],
        }
    }
}

/// Interleaves a row-major matrix of `blocks` blocks a row (a whole number
/// of four-row groups): group `g`, column block `k` is rows `4g .. 4g+4`'s block `k`.
pub fn interleave<X: Interleaved>(rows: &[X::Row], blocks: usize, out: &mut [X]) {
    assert!(rows.len() == out.len() * X::ROWS && rows.len().is_multiple_of(blocks * X::ROWS));
    let mut staged = [X::Row::zeroed(); MAX_ROWS];
    for (group, mixed) in rows.chunks_exact(blocks * X::ROWS).zip(out.chunks_exact_mut(blocks)) {
        for (k, block) in mixed.iter_mut().enumerate() {
            for (r, row) in staged[..X::ROWS].iter_mut().enumerate() {
                *row = group[r * blocks + k];
            }
            *block = X::from_rows(&staged[..X::ROWS]);
        }
    }
}

/// The inverse of [`interleave`].
pub fn deinterleave<X: Interleaved>(mixed: &[X], blocks: usize, out: &mut [X::Row]) {
    assert!(out.len() == mixed.len() * X::ROWS && mixed.len().is_multiple_of(blocks));
    for (group, rows) in mixed.chunks_exact(blocks).zip(out.chunks_exact_mut(blocks * X::ROWS)) {
        for (k, block) in group.iter().enumerate() {
            for r in 0..X::ROWS {
                rows[r * blocks + k] = block.row(r);
            }
        }
    }
}

/// The length of the row-scale table at the start of a whole tensor's
/// bytes (`len` of them, rows of `cols` values): 0 for encodings without.
fn row_scale_head(encoding: Encoding, len: usize, cols: usize) -> usize {
    let rows = len / encoding.tensor_bytes(1, cols);
    debug_assert_eq!(len, encoding.tensor_bytes(rows, cols), "{encoding:?}: {len} bytes are not whole rows of {cols}");
    encoding.row_scale_bytes(rows)
}

/// A row-major Q4B tensor's bytes, `n` values in all, split into its row
/// scales and its blocks.
pub fn split_q4b(bytes: &[u8], n: usize) -> (Vec<f32>, &[BlockQ4B]) {
    let head = bytes.len() - Encoding::Q4B.bytes_for(n);
    let scales = bytes[..head].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    (scales, cast_blocks(&bytes[head..]))
}

/// Rounds one row's Q4_1 blocks into Q4B: the row scale `a` makes the
/// largest block scale 255 (or, if an offset would not fit a byte, the
/// largest offset ±127), each block takes its nearest byte scale and offset,
/// and every value its nearest level on that grid (the Q4_1 nibble, but
/// where the rounded scale moved a value past half a step). Returns `a`.
/// The blocks' scales and minimums must be finite (the converter checks).
pub fn q4b_from_q4_row(row: &[BlockQ4], out: &mut [BlockQ4B]) -> f32 {
    // Q4_1's scale and its midpoint (the value of level 7.5), in f32.
    let parts = |b: &BlockQ4| {
        let (d, m) = (b.d.to_f32(), b.m.to_f32());
        (d, m + 7.5 * d)
    };
    let (mut max_d, mut max_mid) = (0f32, 0f32);
    for b in row {
        let (d, mid) = parts(b);
        max_d = max_d.max(d.abs());
        max_mid = max_mid.max(mid.abs());
    }
    // value = a·(d·(n − 7.5) + 16o): Q4_1's scale is a·d, its midpoint 16a·o.
    let a = (max_d / 255.0).max(max_mid / (16.0 * 127.0));
    if a == 0.0 || !a.is_finite() {
        out.fill(BlockQ4B::zeroed());
        return 0.0;
    }
    for (b, q) in row.iter().zip(out.iter_mut()) {
        let (d, mid) = parts(b);
        let du = (d.abs() / a).round().min(255.0) as u8;
        let o = (mid / (16.0 * a)).round().clamp(-128.0, 127.0) as i8;
        let mut values = [0f32; GROUP];
        dequantize_q4(std::slice::from_ref(b), &mut values);
        let (scale, minimum) = BlockQ4B { d: du, o, qs: [0; GROUP / 2] }.scale_and_minimum();
        let level = |v: f32| if scale > 0.0 { ((v / a - minimum) / scale).round().clamp(0.0, 15.0) as u8 } else { 0 };
        let mut qs = [0u8; GROUP / 2];
        for j in 0..GROUP / 2 {
            qs[j] = level(values[j]) | (level(values[j + GROUP / 2]) << 4);
        }
        *q = BlockQ4B { d: du, o, qs };
    }
    a
}

/// Rounds whole Q4_1 rows (`rows` of `cols` values) into a Q4B tensor's
/// bytes: the row scales, then the blocks ([`q4b_from_q4_row`]).
pub fn q4b_from_q4(rows: &[BlockQ4], cols: usize, out: &mut [u8]) {
    let blocks = cols / GROUP;
    let head = Encoding::Q4B.row_scale_bytes(rows.len() / blocks);
    let (scales, body) = out.split_at_mut(head);
    let body: &mut [BlockQ4B] = cast_blocks_mut(body);
    for ((row, q), scale) in
        rows.chunks_exact(blocks).zip(body.chunks_exact_mut(blocks)).zip(scales.chunks_exact_mut(4))
    {
        scale.copy_from_slice(&q4b_from_q4_row(row, q).to_le_bytes());
    }
}

/// Quantizes `x` (rows of `cols` values) to a Q4B tensor's bytes: Q4_1 by
/// ggml's reference rounding ([`quantize_q4`]), then [`q4b_from_q4`].
pub fn quantize_q4b(x: &[f32], cols: usize, out: &mut [u8]) {
    let mut q4 = vec![BlockQ4::zeroed(); x.len() / GROUP];
    quantize_q4(x, &mut q4);
    q4b_from_q4(&q4, cols, out);
}

/// Expands one Q4B row (scale `a`, its blocks) to f32.
pub fn dequantize_q4b_row(a: f32, blocks: &[BlockQ4B], out: &mut [f32]) {
    for (b, values) in blocks.iter().zip(out.chunks_exact_mut(GROUP)) {
        let (scale, minimum) = b.scale_and_minimum();
        for j in 0..GROUP / 2 {
            values[j] = a * (scale * (b.qs[j] & 0xF) as f32 + minimum);
            values[j + GROUP / 2] = a * (scale * (b.qs[j] >> 4) as f32 + minimum);
        }
    }
}

/// Expands a row-major Q4B tensor's bytes to f32 (`out.len()` values).
fn dequantize_q4b(bytes: &[u8], out: &mut [f32]) {
    let (scales, blocks) = split_q4b(bytes, out.len());
    let cols = out.len() / scales.len().max(1);
    for ((&a, row), values) in scales.iter().zip(blocks.chunks_exact(cols / GROUP)).zip(out.chunks_exact_mut(cols)) {
        dequantize_q4b_row(a, row, values);
    }
}

/// [`interleave`] on raw bytes: `row_major` in `encoding.row_major()`, `out`
/// in `encoding` (an interleaved one), rows of `cols` values.
pub fn interleave_bytes(encoding: Encoding, row_major: &[u8], cols: usize, out: &mut [u8]) {
    // The row scales (Q4B) stay in row order; only the blocks move.
    let head = row_scale_head(encoding, row_major.len(), cols);
    out[..head].copy_from_slice(&row_major[..head]);
    interleave_blocks(encoding, &row_major[head..], cols, &mut out[head..])
}

/// [`interleave_bytes`] on the blocks alone.
fn interleave_blocks(encoding: Encoding, row_major: &[u8], cols: usize, out: &mut [u8]) {
    let blocks = cols / encoding.block_values();
    match encoding {
        // Alignment 1: the byte buffers are the blocks in place.
        Encoding::Q4KX4 => interleave::<BlockQ4Kx4>(cast_blocks(row_major), blocks, cast_blocks_mut(out)),
        Encoding::Q4KX8 => interleave::<BlockQ4Kx8>(cast_blocks(row_major), blocks, cast_blocks_mut(out)),
        Encoding::Q6KX4 => interleave::<BlockQ6Kx4>(cast_blocks(row_major), blocks, cast_blocks_mut(out)),
        Encoding::Q3KX4 => interleave::<BlockQ3Kx4>(cast_blocks(row_major), blocks, cast_blocks_mut(out)),
        Encoding::Q5KX4 => interleave::<BlockQ5Kx4>(cast_blocks(row_major), blocks, cast_blocks_mut(out)),
        Encoding::Q2KX4 => interleave::<BlockQ2Kx4>(cast_blocks(row_major), blocks, cast_blocks_mut(out)),
        Encoding::Q8X4 => interleave::<BlockQ8x4>(&pod_blocks(row_major), blocks, cast_blocks_mut(out)),
        Encoding::Q4X4 => interleave::<BlockQ4x4>(&pod_blocks(row_major), blocks, cast_blocks_mut(out)),
        Encoding::Q4SX4 => interleave::<BlockQ4Sx4>(&pod_blocks(row_major), blocks, cast_blocks_mut(out)),
        Encoding::Q5SX4 => interleave::<BlockQ5Sx4>(&pod_blocks(row_major), blocks, cast_blocks_mut(out)),
        Encoding::Q5X4 => interleave::<BlockQ5x4>(&pod_blocks(row_major), blocks, cast_blocks_mut(out)),
        Encoding::Q4BX4 => interleave::<BlockQ4Bx4>(cast_blocks(row_major), blocks, cast_blocks_mut(out)),
        other => panic!("{other:?} is not an interleaved encoding"),
    }
}

/// [`deinterleave`] on raw bytes (the inverse of [`interleave_bytes`]).
pub fn deinterleave_bytes(encoding: Encoding, mixed: &[u8], cols: usize, out: &mut [u8]) {
    let head = row_scale_head(encoding, mixed.len(), cols);
    out[..head].copy_from_slice(&mixed[..head]);
    deinterleave_blocks(encoding, &mixed[head..], cols, &mut out[head..])
}

/// [`deinterleave_bytes`] on the blocks alone.
fn deinterleave_blocks(encoding: Encoding, mixed: &[u8], cols: usize, out: &mut [u8]) {
    let blocks = cols / encoding.block_values();
    match encoding {
        Encoding::Q4KX4 => deinterleave::<BlockQ4Kx4>(cast_blocks(mixed), blocks, cast_blocks_mut(out)),
        Encoding::Q4KX8 => deinterleave::<BlockQ4Kx8>(cast_blocks(mixed), blocks, cast_blocks_mut(out)),
        Encoding::Q6KX4 => deinterleave::<BlockQ6Kx4>(cast_blocks(mixed), blocks, cast_blocks_mut(out)),
        Encoding::Q3KX4 => deinterleave::<BlockQ3Kx4>(cast_blocks(mixed), blocks, cast_blocks_mut(out)),
        Encoding::Q5KX4 => deinterleave::<BlockQ5Kx4>(cast_blocks(mixed), blocks, cast_blocks_mut(out)),
        Encoding::Q2KX4 => deinterleave::<BlockQ2Kx4>(cast_blocks(mixed), blocks, cast_blocks_mut(out)),
        Encoding::Q8X4 => deinterleave::<BlockQ8x4>(&pod_blocks(mixed), blocks, cast_blocks_mut(out)),
        Encoding::Q4X4 => deinterleave::<BlockQ4x4>(&pod_blocks(mixed), blocks, cast_blocks_mut(out)),
        Encoding::Q4SX4 => deinterleave::<BlockQ4Sx4>(&pod_blocks(mixed), blocks, cast_blocks_mut(out)),
        Encoding::Q5SX4 => deinterleave::<BlockQ5Sx4>(&pod_blocks(mixed), blocks, cast_blocks_mut(out)),
        Encoding::Q5X4 => deinterleave::<BlockQ5x4>(&pod_blocks(mixed), blocks, cast_blocks_mut(out)),
        Encoding::Q4BX4 => deinterleave::<BlockQ4Bx4>(cast_blocks(mixed), blocks, cast_blocks_mut(out)),
        other => panic!("{other:?} is not an interleaved encoding"),
    }
}

/// An activation block quantized to int8 for the integer dot products:
/// value `j` is `d · q[j]`; `s = d · Σ q[j]` serves the minimum term of
/// [`BlockQ4`] and [`BlockQ5`].
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Pod, Zeroable)]
pub struct BlockQ8Act {
    /// Scale.
    pub d: f32,
    /// `d` times the sum of `qs`.
    pub s: f32,
    /// Quantized values.
    pub qs: [i8; GROUP],
}
const _: () = assert!(std::mem::size_of::<BlockQ8Act>() == 40);

/// 256 activation values under one scale (ggml's Q8_K): value `j` is
/// `d · qs[j]` with |qs[j]| ≤ 127 (never −128: the ARMv8.0 Q6_K kernel's
/// 16-bit sums count on it), and `sums[k]` is `Σ qs[32k .. 32k + 32]`.
/// The Pi cores' kernels of [`BlockQ4Kx4`] and [`BlockQ6Kx4`] take these
/// when decoding: with one activation scale a super-block, a row's
/// sub-block sums meet their integer scales in integers and become a float
/// once a super-block (`crate::kernels::matmul::kquant::superblock`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Pod, Zeroable)]
pub struct BlockQ8K {
    /// Scale.
    pub d: f32,
    /// The sums of `qs` over each 32 values.
    pub sums: [i16; QK_K / GROUP],
    /// Quantized values.
    pub qs: [i8; QK_K],
}
const _: () = assert!(std::mem::size_of::<BlockQ8K>() == 276);

/// Quantizes `x` (a multiple of [`GROUP`] long) to Q8, as ggml's `quantize_row_q8_0_ref`.
pub fn quantize_q8(x: &[f32], out: &mut [BlockQ8]) {
    debug_assert_eq!(x.len(), out.len() * GROUP);
    for (block, values) in out.iter_mut().zip(x.chunks_exact(GROUP)) {
        let amax = values.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        block.d = f16::from_f32(d);
        for (q, v) in block.qs.iter_mut().zip(values) {
            *q = (v * id).round() as i8;
        }
    }
}

/// Quantizes `x` to asymmetric Q4, as ggml's `quantize_row_q4_1_ref`.
pub fn quantize_q4(x: &[f32], out: &mut [BlockQ4]) {
    debug_assert_eq!(x.len(), out.len() * GROUP);
    for (block, values) in out.iter_mut().zip(x.chunks_exact(GROUP)) {
        let min = values.iter().fold(f32::INFINITY, |m, &v| m.min(v));
        let max = values.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let d = (max - min) / 15.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        block.d = f16::from_f32(d);
        block.m = f16::from_f32(min);
        for j in 0..GROUP / 2 {
            let lo = (((values[j] - min) * id + 0.5) as u8).min(15);
            let hi = (((values[j + GROUP / 2] - min) * id + 0.5) as u8).min(15);
            block.qs[j] = lo | (hi << 4);
        }
    }
}

/// Quantizes `x` to symmetric Q4, as ggml's `quantize_row_q4_0_ref`.
pub fn quantize_q4s(x: &[f32], out: &mut [BlockQ4S]) {
    debug_assert_eq!(x.len(), out.len() * GROUP);
    for (block, values) in out.iter_mut().zip(x.chunks_exact(GROUP)) {
        // The signed value of largest magnitude maps to −8, so its sign decides the scale's.
        let max = values.iter().fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        block.d = f16::from_f32(d);
        for j in 0..GROUP / 2 {
            let lo = ((values[j] * id + 8.5) as i8).clamp(0, 15) as u8;
            let hi = ((values[j + GROUP / 2] * id + 8.5) as i8).clamp(0, 15) as u8;
            block.qs[j] = lo | (hi << 4);
        }
    }
}

/// Quantizes `x` to symmetric Q5, as ggml's `quantize_row_q5_0_ref`.
pub fn quantize_q5s(x: &[f32], out: &mut [BlockQ5S]) {
    debug_assert_eq!(x.len(), out.len() * GROUP);
    for (block, values) in out.iter_mut().zip(x.chunks_exact(GROUP)) {
        // The signed value of largest magnitude maps to −16, so its sign decides the scale's.
        let max = values.iter().fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
        let d = max / -16.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        // ggml truncates to int8 after adding 16.5, then caps at 31.
        let levels = std::array::from_fn(|j| ((values[j] * id + 16.5) as i8).clamp(0, 31) as u8);
        *block = BlockQ5S::from_levels(f16::from_f32(d), &levels);
    }
}

/// Quantizes `x` to asymmetric Q5, as ggml's `quantize_row_q5_1_ref`.
pub fn quantize_q5(x: &[f32], out: &mut [BlockQ5]) {
    debug_assert_eq!(x.len(), out.len() * GROUP);
    for (block, values) in out.iter_mut().zip(x.chunks_exact(GROUP)) {
        let min = values.iter().fold(f32::INFINITY, |m, &v| m.min(v));
        let max = values.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let d = (max - min) / 31.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        // ggml truncates to uint8 after adding 0.5 and keeps the low five
        // bits (no cap: the largest value lands on 31 at most).
        let levels = std::array::from_fn(|j| ((values[j] - min) * id + 0.5) as u8);
        *block = BlockQ5::from_levels(f16::from_f32(d), f16::from_f32(min), &levels);
    }
}

/// Quantizes `x` to Q8 keeping every value exactly where a block allows it:
/// when each of a block's values is one f16 scale times integers in
/// −127..=127 (a Q5_0 or IQ4_NL block expanded to f32 is: its own scale
/// times 5-bit levels or IQ4_NL's table of int8 values), that scale and
/// those integers; otherwise ggml's rounding ([`quantize_q8`]). Returns how
/// many blocks could not be kept exactly.
pub fn quantize_q8_lossless(x: &[f32], out: &mut [BlockQ8]) -> usize {
    debug_assert_eq!(x.len(), out.len() * GROUP);
    let mut inexact = 0;
    for (block, values) in out.iter_mut().zip(x.chunks_exact(GROUP)) {
        quantize_q8(values, std::slice::from_mut(block));
        if q8_reproduces(block, values) {
            continue;
        }
        // The scale is the largest magnitude over its level k; try every k.
        let amax = values.iter().fold(0f32, |m, v| m.max(v.abs()));
        let exact = (1..=127).find_map(|k| {
            let d = f16::from_f32(amax / k as f32);
            if d.to_f32() * k as f32 != amax {
                return None;
            }
            let id = 1.0 / d.to_f32();
            let candidate =
                BlockQ8 { d, qs: std::array::from_fn(|j| (values[j] * id).round().clamp(-127.0, 127.0) as i8) };
            q8_reproduces(&candidate, values).then_some(candidate)
        });
        match exact {
            Some(candidate) => *block = candidate,
            None => inexact += 1,
        }
    }
    inexact
}

/// Whether `block` expands to exactly `values` (as [`dequantize_q8`] computes them).
fn q8_reproduces(block: &BlockQ8, values: &[f32]) -> bool {
    let d = block.d.to_f32();
    block.qs.iter().zip(values).all(|(&q, &v)| d * q as f32 == v)
}

/// Expands Q8 blocks to f32.
pub fn dequantize_q8(blocks: &[BlockQ8], out: &mut [f32]) {
    for (block, values) in blocks.iter().zip(out.chunks_exact_mut(GROUP)) {
        let d = block.d.to_f32();
        for (v, &q) in values.iter_mut().zip(&block.qs) {
            *v = d * q as f32;
        }
    }
}

/// Expands asymmetric Q4 blocks to f32.
pub fn dequantize_q4(blocks: &[BlockQ4], out: &mut [f32]) {
    for (block, values) in blocks.iter().zip(out.chunks_exact_mut(GROUP)) {
        let (d, m) = (block.d.to_f32(), block.m.to_f32());
        for j in 0..GROUP / 2 {
            values[j] = d * (block.qs[j] & 0xF) as f32 + m;
            values[j + GROUP / 2] = d * (block.qs[j] >> 4) as f32 + m;
        }
    }
}

/// Expands symmetric Q4 blocks to f32.
pub fn dequantize_q4s(blocks: &[BlockQ4S], out: &mut [f32]) {
    for (block, values) in blocks.iter().zip(out.chunks_exact_mut(GROUP)) {
        let d = block.d.to_f32();
        for j in 0..GROUP / 2 {
            values[j] = d * ((block.qs[j] & 0xF) as i32 - 8) as f32;
            values[j + GROUP / 2] = d * ((block.qs[j] >> 4) as i32 - 8) as f32;
        }
    }
}

/// Expands symmetric Q5 blocks to f32, as ggml's `dequantize_row_q5_0`.
pub fn dequantize_q5s(blocks: &[BlockQ5S], out: &mut [f32]) {
    for (block, values) in blocks.iter().zip(out.chunks_exact_mut(GROUP)) {
        let d = block.d.to_f32();
        for (j, v) in values.iter_mut().enumerate() {
            *v = (block.level(j) as i32 - 16) as f32 * d;
        }
    }
}

/// Expands asymmetric Q5 blocks to f32, as ggml's `dequantize_row_q5_1`.
pub fn dequantize_q5(blocks: &[BlockQ5], out: &mut [f32]) {
    for (block, values) in blocks.iter().zip(out.chunks_exact_mut(GROUP)) {
        let (d, m) = (block.d.to_f32(), block.m.to_f32());
        for (j, v) in values.iter_mut().enumerate() {
            *v = block.level(j) as f32 * d + m;
        }
    }
}

/// Quantizes `x` (a multiple of [`QK_K`] long) into k-quant super-blocks
/// with `quantize` (the simple min/max quantizers of [`crate::kquant`]).
pub fn quantize_k<B>(x: &[f32], out: &mut [B], quantize: fn(&[f32]) -> B) {
    debug_assert_eq!(x.len(), out.len() * QK_K);
    for (block, values) in out.iter_mut().zip(x.chunks_exact(QK_K)) {
        *block = quantize(values);
    }
}

/// Expands k-quant super-blocks to f32 with `dequantize` (ggml's `dequantize_row_*`).
pub fn dequantize_k<B>(blocks: &[B], out: &mut [f32], dequantize: fn(&B, &mut [f32])) {
    for (block, values) in blocks.iter().zip(out.chunks_exact_mut(QK_K)) {
        dequantize(block, values);
    }
}

/// Quantizes `x` to `encoding` into raw bytes (`out` exactly [`Encoding::bytes_for`] long).
pub fn quantize_into(encoding: Encoding, x: &[f32], out: &mut [u8]) {
    match encoding {
        Encoding::F32 => out.copy_from_slice(bytemuck::cast_slice(x)),
        Encoding::F16 => {
            for (chunk, &v) in out.chunks_exact_mut(2).zip(x) {
                chunk.copy_from_slice(&f16::from_f32(v).to_le_bytes());
            }
        }
        Encoding::Q8 => quantize_q8(x, cast_blocks_mut(out)),
        Encoding::Q4 => quantize_q4(x, cast_blocks_mut(out)),
        Encoding::Q4S => quantize_q4s(x, cast_blocks_mut(out)),
        Encoding::Q5S => quantize_q5s(x, cast_blocks_mut(out)),
        Encoding::Q5 => quantize_q5(x, cast_blocks_mut(out)),
        Encoding::Q4K => quantize_k(x, cast_blocks_mut(out), BlockQ4K::quantize),
        Encoding::Q5K => quantize_k(x, cast_blocks_mut(out), BlockQ5K::quantize),
        Encoding::Q6K => quantize_k(x, cast_blocks_mut(out), BlockQ6K::quantize),
        Encoding::Q3K => quantize_k(x, cast_blocks_mut(out), BlockQ3K::quantize),
        Encoding::Q2K => quantize_k(x, cast_blocks_mut(out), BlockQ2K::quantize),
        Encoding::Q4B => {
            // The row scales' bytes say how many rows there are.
            let rows = (out.len() - Encoding::Q4B.bytes_for(x.len())) / 4;
            quantize_q4b(x, x.len() / rows.max(1), out)
        }
        interleaved => panic!("{interleaved:?}: quantize to its row-major encoding, then interleave_bytes"),
    }
}

/// Expands raw bytes of `encoding` to f32 (`out.len()` values).
pub fn dequantize_from(encoding: Encoding, bytes: &[u8], out: &mut [f32]) {
    match encoding {
        Encoding::F32 => {
            for (v, chunk) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *v = f32::from_le_bytes(chunk.try_into().unwrap());
            }
        }
        Encoding::F16 => {
            for (v, chunk) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *v = f16::from_le_bytes([chunk[0], chunk[1]]).to_f32();
            }
        }
        Encoding::Q8 => dequantize_q8(&pod_blocks(bytes), out),
        Encoding::Q4 => dequantize_q4(&pod_blocks(bytes), out),
        Encoding::Q4S => dequantize_q4s(&pod_blocks(bytes), out),
        Encoding::Q5S => dequantize_q5s(&pod_blocks(bytes), out),
        Encoding::Q5 => dequantize_q5(&pod_blocks(bytes), out),
        // Alignment 1: the bytes are the blocks, wherever they start.
        Encoding::Q4K => dequantize_k(cast_blocks::<BlockQ4K>(bytes), out, BlockQ4K::dequantize),
        Encoding::Q5K => dequantize_k(cast_blocks::<BlockQ5K>(bytes), out, BlockQ5K::dequantize),
        Encoding::Q6K => dequantize_k(cast_blocks::<BlockQ6K>(bytes), out, BlockQ6K::dequantize),
        Encoding::Q3K => dequantize_k(cast_blocks::<BlockQ3K>(bytes), out, BlockQ3K::dequantize),
        Encoding::Q2K => dequantize_k(cast_blocks::<BlockQ2K>(bytes), out, BlockQ2K::dequantize),
        Encoding::Q4B => dequantize_q4b(bytes, out),
        interleaved => panic!("{interleaved:?}: deinterleave_bytes first"),
    }
}

/// Expands a tensor of any encoding to f32, rows of `cols` values.
pub fn dequantize_rows(encoding: Encoding, bytes: &[u8], cols: usize, out: &mut [f32]) {
    if encoding.row_major() == encoding {
        return dequantize_from(encoding, bytes, out);
    }
    let mut row_major = vec![0u8; bytes.len()];
    if encoding.is_channel_major() {
        from_channel_major(encoding, bytes, cols, &mut row_major);
    } else {
        deinterleave_bytes(encoding, bytes, cols, &mut row_major);
    }
    dequantize_from(encoding.row_major(), &row_major, out)
}

/// Rows of a channel-major matrix come in tiles of this many; a column's
/// values for one tile are 32 bytes (Q8) or 16 bytes (Q4).
pub const CHANNEL_TILE: usize = 32;

/// Byte offsets inside column block `b` of a channel-major matrix of `rows`
/// rows: where the block starts, where its scales start and its minimums
/// (Q4 only), and where column `j`'s values start (`+ j·column_bytes`).
#[derive(Debug, Clone, Copy)]
pub struct ChannelBlock {
    /// Start of the block's scales: `rows` f16 values, row order.
    pub scales: usize,
    /// Start of the block's minimums (Q4C): `rows` f16 values.
    pub mins: usize,
    /// Start of the block's first column.
    pub columns: usize,
    /// Bytes of one column: `rows` (Q8C) or `rows / 2` (Q4C).
    pub column_bytes: usize,
}

impl ChannelBlock {
    /// The offsets of column block `b` in a `rows`-row matrix of `encoding` (Q8C or Q4C).
    #[inline(always)]
    pub fn new(encoding: Encoding, rows: usize, b: usize) -> Self {
        let per_row = encoding.bytes_for(GROUP);
        let start = b * rows * per_row;
        match encoding {
            Encoding::Q8C => Self { scales: start, mins: start, columns: start + 2 * rows, column_bytes: rows },
            _ => Self { scales: start, mins: start + 2 * rows, columns: start + 4 * rows, column_bytes: rows / 2 },
        }
    }
}

/// Rearranges a row-major Q8 or Q4 matrix (`rows × cols`, `rows` a
/// multiple of [`CHANNEL_TILE`]) into `encoding`, its channel-major form,
/// for the R-Sparse kernels, which read only the columns of active input
/// channels. Lossless: the same scales and values, moved. Per column block
/// `b` (input channels `32b .. 32b+32`), in order:
/// - the `rows` scales (f16), then for Q4C the `rows` minimums (f16);
/// - the 32 columns, each the block's values of one channel for every row:
///   - Q8C: one int8 per row;
///   - Q4C: per tile of 32 rows, 16 bytes; byte `k` holds row `k` in its low
///     nibble and row `k + 16` in its high nibble, each stored as `n ^ 8`,
///     i.e. `n − 8` in two's complement (the kernels sign-extend it and add
///     `8·Σq` back, which keeps 32 products inside 16 bits).
pub fn to_channel_major(encoding: Encoding, row_major: &[u8], cols: usize, out: &mut [u8]) {
    let rows = row_major.len() / encoding.bytes_for(cols);
    assert!(encoding.is_channel_major() && rows.is_multiple_of(CHANNEL_TILE) && out.len() == row_major.len());
    out.fill(0);
    channel_major_moves(encoding, rows, cols, |step| match step {
        Move::Bytes(row_major_at, channel_at) => out[channel_at].copy_from_slice(&row_major[row_major_at]),
        Move::Nibble((byte, high), (slot, slot_high)) => {
            let n = (row_major[byte] >> (4 * high as u32)) & 0xF;
            out[slot] |= (n ^ 8) << (4 * slot_high as u32);
        }
    });
}

/// The inverse of [`to_channel_major`]: `channel_major` in `encoding`, `out` row-major.
pub fn from_channel_major(encoding: Encoding, channel_major: &[u8], cols: usize, out: &mut [u8]) {
    let rows = channel_major.len() / encoding.bytes_for(cols);
    assert!(encoding.is_channel_major() && rows.is_multiple_of(CHANNEL_TILE) && out.len() == channel_major.len());
    out.fill(0);
    channel_major_moves(encoding, rows, cols, |step| match step {
        Move::Bytes(row_major_at, channel_at) => out[row_major_at].copy_from_slice(&channel_major[channel_at]),
        Move::Nibble((byte, high), (slot, slot_high)) => {
            let n = ((channel_major[slot] >> (4 * slot_high as u32)) & 0xF) ^ 8;
            out[byte] |= n << (4 * high as u32);
        }
    });
}

/// One correspondence between row-major and channel-major bytes.
enum Move {
    /// Whole bytes: (row-major range, channel-major range).
    Bytes(std::ops::Range<usize>, std::ops::Range<usize>),
    /// A Q4 nibble: (row-major byte, high nibble?), (channel-major byte, high nibble?).
    Nibble((usize, bool), (usize, bool)),
}

/// Every [`Move`] of a `rows × cols` matrix between the two orders.
fn channel_major_moves(encoding: Encoding, rows: usize, cols: usize, mut each: impl FnMut(Move)) {
    let blocks = cols / GROUP;
    let block_bytes = encoding.bytes_for(GROUP);
    for b in 0..blocks {
        let at = ChannelBlock::new(encoding, rows, b);
        for r in 0..rows {
            let row_block = (r * blocks + b) * block_bytes;
            each(Move::Bytes(row_block..row_block + 2, at.scales + 2 * r..at.scales + 2 * r + 2));
            match encoding {
                Encoding::Q8C => {
                    for j in 0..GROUP {
                        let slot = at.columns + j * at.column_bytes + r;
                        each(Move::Bytes(row_block + 2 + j..row_block + 3 + j, slot..slot + 1));
                    }
                }
                _ => {
                    each(Move::Bytes(row_block + 2..row_block + 4, at.mins + 2 * r..at.mins + 2 * r + 2));
                    let (tile, k) = (r / CHANNEL_TILE, r % CHANNEL_TILE);
                    for j in 0..GROUP {
                        let source = (row_block + 4 + j % 16, j >= 16);
                        let slot = at.columns + j * at.column_bytes + tile * 16 + k % 16;
                        each(Move::Nibble(source, (slot, k >= 16)));
                    }
                }
            }
        }
    }
}

/// Views a byte buffer as blocks. Blocks are 2-byte aligned; the byte buffers
/// the converter hands in come from `Vec<u8>`, so this checks rather than assumes.
fn cast_blocks_mut<T: Pod>(bytes: &mut [u8]) -> &mut [T] {
    bytemuck::try_cast_slice_mut(bytes).expect("quantization buffer is block-aligned and block-sized")
}

/// Views bytes as blocks of alignment 1 (the k-quants), in place.
fn cast_blocks<T: Pod>(bytes: &[u8]) -> &[T] {
    bytemuck::try_cast_slice(bytes).expect("k-quant bytes are whole blocks")
}

/// Copies bytes into blocks (works whatever the alignment of `bytes`).
fn pod_blocks<T: Pod>(bytes: &[u8]) -> Vec<T> {
    bytemuck::pod_collect_to_vec(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(n: usize) -> Vec<f32> {
        (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect()
    }

    #[test]
    fn round_trips_stay_within_half_a_step() {
        let x = ramp(GROUP * 8);
        for enc in [Encoding::Q8, Encoding::Q4, Encoding::Q4S, Encoding::F16] {
            let mut bytes = vec![0u8; enc.bytes_for(x.len())];
            quantize_into(enc, &x, &mut bytes);
            let mut y = vec![0f32; x.len()];
            dequantize_from(enc, &bytes, &mut y);
            for (block_x, block_y) in x.chunks(GROUP).zip(y.chunks(GROUP)) {
                let range = block_x.iter().fold(0f32, |m, v| m.max(v.abs())) * 2.0;
                let step = match enc {
                    Encoding::Q8 => range / 254.0,
                    Encoding::Q4 => range / 15.0,
                    // Q4_0 maps the largest magnitude to −8 and clips the other
                    // side at +7: a value there may be off by a whole step.
                    Encoding::Q4S => range / 8.0,
                    _ => range / 1000.0,
                };
                for (a, b) in block_x.iter().zip(block_y) {
                    assert!((a - b).abs() <= step * 0.5 + 1e-3, "{enc:?}: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn interleaving_is_a_lossless_permutation() {
        let (rows, cols) = (8, 3 * GROUP);
        let x = ramp(rows * cols);
        for encoding in [Encoding::Q8X4, Encoding::Q4X4, Encoding::Q4SX4] {
            let base = encoding.row_major();
            let mut row_major = vec![0u8; base.bytes_for(x.len())];
            quantize_into(base, &x, &mut row_major);
            let mut mixed = vec![0u8; encoding.bytes_for(x.len())];
            interleave_bytes(encoding, &row_major, cols, &mut mixed);
            assert_ne!(mixed, row_major, "{encoding:?}: interleaving moved nothing");
            let mut sorted = (mixed.clone(), row_major.clone());
            sorted.0.sort_unstable();
            sorted.1.sort_unstable();
            assert_eq!(sorted.0, sorted.1, "{encoding:?}: not a permutation of the bytes");
            let mut back = vec![0u8; mixed.len()];
            deinterleave_bytes(encoding, &mixed, cols, &mut back);
            assert_eq!(back, row_major, "{encoding:?}");
            let (mut a, mut b) = (vec![0f32; x.len()], vec![0f32; x.len()]);
            dequantize_from(base, &row_major, &mut a);
            dequantize_rows(encoding, &mixed, cols, &mut b);
            assert_eq!(a, b, "{encoding:?}");
        }
    }

    #[test]
    fn channel_major_is_a_lossless_rearrangement() {
        let (rows, cols) = (2 * CHANNEL_TILE, 3 * GROUP);
        let x: Vec<f32> = ramp(rows * cols).iter().enumerate().map(|(i, v)| v * (1.0 + (i % 7) as f32)).collect();
        for encoding in [Encoding::Q8C, Encoding::Q4C] {
            let base = encoding.row_major();
            let mut row_major = vec![0u8; base.bytes_for(x.len())];
            quantize_into(base, &x, &mut row_major);
            let mut columns = vec![0u8; encoding.bytes_for(x.len())];
            to_channel_major(encoding, &row_major, cols, &mut columns);
            assert_ne!(columns, row_major, "{encoding:?}: moved nothing");
            let mut back = vec![0u8; columns.len()];
            from_channel_major(encoding, &columns, cols, &mut back);
            assert_eq!(back, row_major, "{encoding:?}");
            let (mut a, mut b) = (vec![0f32; x.len()], vec![0f32; x.len()]);
            dequantize_from(base, &row_major, &mut a);
            dequantize_rows(encoding, &columns, cols, &mut b);
            assert_eq!(a, b, "{encoding:?}");
            // Column 33 (block 1, channel 1) holds every row's value of that channel.
            let at = ChannelBlock::new(encoding, rows, 1);
            for r in 0..rows {
                let stored = match encoding {
                    Encoding::Q8C => columns[at.columns + at.column_bytes + r] as i8 as f32,
                    _ => {
                        let byte = columns[at.columns + at.column_bytes + r / 32 * 16 + r % 16];
                        let nibble = (byte >> if r % 32 >= 16 { 4 } else { 0 }) & 0xF;
                        (((nibble as i8) << 4) >> 4) as f32 + 8.0
                    }
                };
                let scale = half::f16::from_le_bytes([columns[at.scales + 2 * r], columns[at.scales + 2 * r + 1]]);
                let min = match encoding {
                    Encoding::Q8C => 0.0,
                    _ => half::f16::from_le_bytes([columns[at.mins + 2 * r], columns[at.mins + 2 * r + 1]]).to_f32(),
                };
                assert_eq!(scale.to_f32() * stored + min, a[r * cols + 33], "{encoding:?} row {r}");
            }
        }
    }

    #[test]
    fn interleaved_block_puts_four_rows_columns_side_by_side() {
        let rows: [BlockQ8; 4] = std::array::from_fn(|r| BlockQ8 {
            d: f16::from_f32(r as f32),
            qs: std::array::from_fn(|j| (r * 32 + j) as i8),
        });
        let mixed = BlockQ8x4::from_rows(&rows);
        // Bytes 16c + 4r + j hold row r's value 4c + j.
        assert_eq!(&mixed.qs[..8], &[0, 1, 2, 3, 32, 33, 34, 35]);
        assert_eq!(mixed.qs[16 * 7 + 4 * 3 + 3], (3 * 32 + 31) as i8);
        assert_eq!(mixed.d.map(|d| d.to_f32()), [0.0, 1.0, 2.0, 3.0]);
    }

    #[test]
    fn zero_block_quantizes_to_zero() {
        let x = vec![0f32; GROUP];
        let mut q = [BlockQ4S::zeroed()];
        quantize_q4s(&x, &mut q);
        let mut y = vec![1f32; GROUP];
        dequantize_q4s(&q, &mut y);
        assert!(y.iter().all(|&v| v == 0.0));
    }
}

#[cfg(test)]
mod kquant_tests {
    use super::*;

    #[test]
    fn kquant_encodings_count_super_blocks_of_256() {
        for (encoding, id, name, block_bytes) in [
            (Encoding::Q4K, 10, "q4k", 144),
            (Encoding::Q5K, 11, "q5k", 176),
            (Encoding::Q6K, 12, "q6k", 210),
            (Encoding::Q3K, 13, "q3k", 110),
            (Encoding::Q2K, 23, "q2k", 84),
        ] {
            assert_eq!((encoding.id(), encoding.name()), (id, name));
            assert_eq!(Encoding::from_id(id), Some(encoding));
            assert_eq!(Encoding::from_name(name), Some(encoding));
            assert_eq!(encoding.block_values(), 256);
            assert_eq!(encoding.bytes_for(3 * 256), 3 * block_bytes);
            assert!(encoding.is_blocked() && encoding.is_kquant());
            // Row-major, no channel-major form.
            assert_eq!((encoding.row_major(), encoding.rows_interleaved(), encoding.row_multiple()), (encoding, 1, 1));
            assert_eq!(encoding.channel_major(), None);
            let x: Vec<f32> = (0..2 * 256).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect();
            let mut bytes = vec![0u8; encoding.bytes_for(x.len())];
            quantize_into(encoding, &x, &mut bytes);
            let (mut y, mut z) = (vec![0f32; x.len()], vec![0f32; x.len()]);
            dequantize_from(encoding, &bytes, &mut y);
            // From an odd offset too: the blocks have alignment 1.
            let mut shifted = vec![0u8; bytes.len() + 1];
            shifted[1..].copy_from_slice(&bytes);
            dequantize_rows(encoding, &shifted[1..], 256, &mut z);
            assert_eq!(y, z, "{encoding:?}");
            let range = 100.0 / 17.0;
            let worst = x.iter().zip(&y).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(worst < range / 4.0, "{encoding:?}: worst error {worst}");
        }
        for other in [Encoding::Q8, Encoding::Q4X4, Encoding::Q4C] {
            assert_eq!(other.block_values(), GROUP);
        }
        assert_eq!((Encoding::F32.block_values(), Encoding::F16.block_values()), (1, 1));
    }

    /// Values that are one f16 scale times small integers (a Q5_0 block,
    /// scale negative as ggml's quantizer makes them) come back exactly;
    /// values that are not fall back to ggml's rounding.
    #[test]
    fn lossless_q8_keeps_scaled_integers_exactly() {
        let d = f16::from_f32(-0.0123).to_f32();
        let levels: Vec<i32> = (0..GROUP as i32).map(|j| (j * 7) % 32 - 16).collect();
        let exact: Vec<f32> = levels.iter().map(|&k| d * k as f32).collect();
        let mut out = [BlockQ8::zeroed()];
        assert_eq!(quantize_q8_lossless(&exact, &mut out), 0);
        let mut back = vec![0f32; GROUP];
        dequantize_q8(&out, &mut back);
        assert_eq!(back, exact);
        // ggml's rounding alone would not have kept them.
        quantize_q8(&exact, &mut out);
        dequantize_q8(&out, &mut back);
        assert_ne!(back, exact);
        let irregular: Vec<f32> = (0..GROUP).map(|j| (j as f32 * 0.37).sin()).collect();
        let mut rounded = [BlockQ8::zeroed()];
        quantize_q8(&irregular, &mut rounded);
        assert_eq!(quantize_q8_lossless(&irregular, &mut out), 1);
        assert_eq!(out, rounded);
    }

    /// The interleaved k-quants hold the row-major super-blocks' bytes,
    /// moved: random bytes (every field, any value) come back byte for byte,
    /// the 6-bit scales sit `[byte][row]` and the values `[4 columns][row]`.
    #[test]
    fn kquant_interleaving_is_a_lossless_permutation() {
        let mut seed = 0x9E37_79B9u32;
        let mut random_bytes = |n: usize| -> Vec<u8> {
            (0..n)
                .map(|_| {
                    seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
                    (seed >> 24) as u8
                })
                .collect()
        };
        // A retired id is never given to a live encoding again.
        assert!(Encoding::retired(15).is_some() && Encoding::from_id(15).is_none());
        assert!(Encoding::ALL.iter().all(|e| Encoding::retired(e.id()).is_none()));
        for (encoding, id, name) in [
            (Encoding::Q4KX4, 14, "q4kx4"),
            (Encoding::Q6KX4, 16, "q6kx4"),
            (Encoding::Q3KX4, 17, "q3kx4"),
            (Encoding::Q5KX4, 18, "q5kx4"),
            (Encoding::Q2KX4, 24, "q2kx4"),
        ] {
            assert_eq!((encoding.id(), encoding.name(), Encoding::from_id(id)), (id, name, Some(encoding)));
            assert_eq!(encoding.row_major().interleaved(), Some(encoding));
            assert_eq!((encoding.block_values(), encoding.rows_interleaved(), encoding.row_multiple()), (QK_K, 4, 4));
            assert!(encoding.is_kquant() && encoding.is_blocked());
            for (rows, cols) in [(4, QK_K), (8, 3 * QK_K), (12, 2 * QK_K)] {
                let row_major = random_bytes(encoding.bytes_for(rows * cols));
                let mut mixed = vec![0u8; row_major.len()];
                interleave_bytes(encoding, &row_major, cols, &mut mixed);
                assert_ne!(mixed, row_major, "{encoding:?}: interleaving moved nothing");
                let mut back = vec![0u8; mixed.len()];
                deinterleave_bytes(encoding, &mixed, cols, &mut back);
                assert_eq!(back, row_major, "{encoding:?} {rows}×{cols}");
                if encoding == Encoding::Q3KX4 {
                    // Its levels are repacked, not moved: checked below.
                    continue;
                }
                // Moved bytes, but for Q6KX4's `qh`, stored XOR its flip.
                let mut moved = mixed.clone();
                if encoding == Encoding::Q6KX4 {
                    let qh = std::mem::offset_of!(BlockQ6Kx4, qh);
                    for block in moved.chunks_exact_mut(size_of::<BlockQ6Kx4>()) {
                        block[qh..].iter_mut().for_each(|b| *b ^= Q6K_HIGH_FLIP);
                    }
                }
                let mut sorted = (moved, row_major.clone());
                sorted.0.sort_unstable();
                sorted.1.sort_unstable();
                assert_eq!(sorted.0, sorted.1, "{encoding:?}: not a permutation of the bytes");
            }
        }
        // Where the bytes go, on one group of four rows of one super-block.
        let rows: [BlockQ4K; 4] = std::array::from_fn(|r| {
            let mut block: BlockQ4K = bytemuck::pod_read_unaligned(&random_bytes(144));
            block.scales = std::array::from_fn(|i| (16 * r + i) as u8);
            block.qs = std::array::from_fn(|i| (i + r) as u8);
            block
        });
        let mixed = BlockQ4Kx4::from_rows(&rows);
        assert_eq!(&mixed.scales[..8], &[0, 16, 32, 48, 1, 17, 33, 49]);
        assert_eq!(&mixed.qs[..8], &[0, 1, 2, 3, 1, 2, 3, 4]);
        assert_eq!(mixed.qs[16 * 31 + 4 * 3 + 3], 127 + 3);
        assert_eq!(mixed.d, rows.map(|b| b.d));
        // Eight rows: every byte of random rows comes back, on matrices of
        // whole groups of eight; two rows' levels share a byte, the high
        // one flipped.
        let encoding = Encoding::Q4KX8;
        assert_eq!((encoding.id(), encoding.name(), Encoding::from_id(27)), (27, "q4kx8", Some(encoding)));
        assert_eq!((encoding.row_major(), encoding.rows_interleaved(), encoding.row_multiple()), (Encoding::Q4K, 8, 8));
        assert_eq!(Encoding::Q4K.interleaved_for(16), Some(Encoding::Q4KX8));
        assert_eq!(Encoding::Q4K.interleaved_for(12), Some(Encoding::Q4KX4));
        assert_eq!(Encoding::Q4K.interleaved_for(6), None);
        assert_eq!(Encoding::Q6K.interleaved_for(16), Some(Encoding::Q6KX4));
        for (rows, cols) in [(8, QK_K), (16, 3 * QK_K)] {
            let row_major = random_bytes(encoding.bytes_for(rows * cols));
            let mut mixed = vec![0u8; row_major.len()];
            interleave_bytes(encoding, &row_major, cols, &mut mixed);
            assert_ne!(mixed, row_major);
            let mut back = vec![0u8; mixed.len()];
            deinterleave_bytes(encoding, &mixed, cols, &mut back);
            assert_eq!(back, row_major, "{encoding:?} {rows}×{cols}");
        }
        let eight: Vec<BlockQ4K> = (0..8).map(|r| rows[r % 4]).collect();
        let mixed = BlockQ4Kx8::from_rows(&eight);
        assert_eq!(&mixed.heads[0][..], &bytemuck::bytes_of(&BlockQ4Kx4::from_rows(&rows))[..Q4K_HEAD]);
        // Row 0's first four levels (qs 0, 1, 2, 3: low nibbles) and row
        // 4's (the same row's), XOR 8, above them.
        assert_eq!(&mixed.qs[..4], &[0x80, 0x91, 0xA2, 0xB3]);
        // Column 32 (sub-block 1, the high nibbles of bytes 0..): row 1's
        // byte 0 is 1, so level 0, and row 5's too.
        assert_eq!(mixed.qs[128 + 4], 0x80);
        let rows: [BlockQ6K; 4] = std::array::from_fn(|r| {
            let mut block: BlockQ6K = bytemuck::pod_read_unaligned(&random_bytes(210));
            block.scales = std::array::from_fn(|i| (16 * r + i) as u8);
            block.qh = std::array::from_fn(|i| (2 * i + r) as u8);
            block
        });
        let mixed = BlockQ6Kx4::from_rows(&rows);
        assert_eq!(&mixed.scales[60..], &[15, 31, 47, 63]);
        assert_eq!(&mixed.qh[16..24], &[8, 10, 12, 14, 9, 11, 13, 15].map(|b| b ^ Q6K_HIGH_FLIP));
        for (r, row) in rows.iter().enumerate() {
            assert_eq!(bytemuck::bytes_of(&mixed.row(r)), bytemuck::bytes_of(row));
        }
        // Q3KX4's planes hold each level as a three-bit signed number where
        // its documentation says, and its scales' high bits flipped.
        let rows: [BlockQ3K; 4] = std::array::from_fn(|_| bytemuck::pod_read_unaligned(&random_bytes(110)));
        let mixed = BlockQ3Kx4::from_rows(&rows);
        let signed = |bits: u8| ((bits << 5) as i8 >> 5) as i32;
        for (r, row) in rows.iter().enumerate() {
            for l in 0..32 {
                let at = 16 * (l / 4) + 4 * r + l % 4;
                let [p0, p1, p2] = mixed.planes.map(|p| p[at]);
                let stored = [
                    p0 >> 5,
                    p0 >> 2,
                    p1 >> 5,
                    p1 >> 2,
                    p2 >> 5,
                    p2 >> 2,
                    (p0 & 3) | (p2 & 1) << 2,
                    (p1 & 3) | (p2 & 2) << 1,
                ];
                for (k, &bits) in stored.iter().enumerate() {
                    let level = crate::kernels::matmul::kquant::scalar::levels_q3k(row, k)[l] as i32;
                    assert_eq!(signed(bits & 7), level, "row {r}, value {}", 32 * k + l);
                }
            }
            for i in 0..12 {
                let flip = if i >= 8 { Q3K_SCALE_FLIP } else { 0 };
                assert_eq!(mixed.scales[4 * i + r], row.scales[i] ^ flip);
            }
            assert_eq!(bytemuck::bytes_of(&mixed.row(r)), bytemuck::bytes_of(row));
        }
        let rows: [BlockQ5K; 4] = std::array::from_fn(|r| {
            let mut block: BlockQ5K = bytemuck::pod_read_unaligned(&random_bytes(176));
            block.qh = std::array::from_fn(|i| (i + 8 * r) as u8);
            block
        });
        let mixed = BlockQ5Kx4::from_rows(&rows);
        assert_eq!(&mixed.qh[16..24], &[4, 5, 6, 7, 12, 13, 14, 15]);
        for (r, row) in rows.iter().enumerate() {
            assert_eq!(bytemuck::bytes_of(&mixed.row(r)), bytemuck::bytes_of(row));
        }
        // Q2KX4: scales a byte at a time, levels four bytes at a time.
        let rows: [BlockQ2K; 4] = std::array::from_fn(|r| {
            let mut block: BlockQ2K = bytemuck::pod_read_unaligned(&random_bytes(84));
            block.scales = std::array::from_fn(|i| (16 * r + i) as u8);
            block.qs = std::array::from_fn(|i| (i + 64 * r) as u8);
            block
        });
        let mixed = BlockQ2Kx4::from_rows(&rows);
        assert_eq!(&mixed.scales[..8], &[0, 16, 32, 48, 1, 17, 33, 49]);
        assert_eq!(&mixed.qs[..8], &[0, 1, 2, 3, 64, 65, 66, 67]);
        assert_eq!(mixed.qs[16 * 15 + 4 * 3 + 3], 63 + 3 * 64);
        assert_eq!((mixed.d, mixed.dmin), (rows.map(|b| b.d), rows.map(|b| b.dmin)));
        for (r, row) in rows.iter().enumerate() {
            assert_eq!(bytemuck::bytes_of(&mixed.row(r)), bytemuck::bytes_of(row));
        }
    }
}

#[cfg(test)]
mod q5_tests {
    //! Q5_0 (`q5s`, `q5sx4`) and Q5_1 (`q5`, `q5x4`): ggml's blocks of 32
    //! with a fifth bit, the second with a minimum.
    use super::*;

    fn random_bytes(seed: &mut u32, n: usize) -> Vec<u8> {
        (0..n)
            .map(|_| {
                *seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
                (*seed >> 24) as u8
            })
            .collect()
    }

    /// The identity of a row-major encoding and its interleaved form: ids,
    /// names, block sizes and how they map onto each other.
    fn check_identity(row_major: (Encoding, u32, &str), interleaved: (Encoding, u32, &str), block_bytes: usize) {
        for (encoding, id, name) in [row_major, interleaved] {
            assert_eq!((encoding.id(), encoding.name()), (id, name));
            assert_eq!((Encoding::from_id(id), Encoding::from_name(name)), (Some(encoding), Some(encoding)));
            assert_eq!((encoding.block_values(), encoding.bytes_for(3 * GROUP)), (GROUP, 3 * block_bytes));
            assert!(encoding.is_blocked() && !encoding.is_kquant() && Encoding::retired(id).is_none());
            assert_eq!(encoding.row_major(), row_major.0);
        }
        assert_eq!(row_major.0.interleaved(), Some(interleaved.0));
        assert_eq!((interleaved.0.rows_interleaved(), interleaved.0.row_multiple()), (4, 4));
        assert_eq!(row_major.0.channel_major(), None);
    }

    #[test]
    fn q5s_and_q5_encodings_are_ggml_q5_0_and_q5_1_blocks_of_32() {
        check_identity((Encoding::Q5S, 19, "q5s"), (Encoding::Q5SX4, 20, "q5sx4"), 22);
        check_identity((Encoding::Q5, 21, "q5"), (Encoding::Q5X4, 22, "q5x4"), 24);
    }

    /// Any bytes (every field, any value) come back byte for byte from the
    /// interleaved blocks, and both forms dequantize to the same bits.
    fn check_interleaving_is_lossless(row_major: Encoding, interleaved: Encoding, seed: &mut u32) {
        for (rows, cols) in [(4, GROUP), (8, 3 * GROUP), (12, 18 * GROUP)] {
            let bytes = random_bytes(seed, row_major.bytes_for(rows * cols));
            let mut mixed = vec![0u8; bytes.len()];
            interleave_bytes(interleaved, &bytes, cols, &mut mixed);
            assert_ne!(mixed, bytes);
            let mut back = vec![0u8; mixed.len()];
            deinterleave_bytes(interleaved, &mixed, cols, &mut back);
            assert_eq!(back, bytes, "{} {rows}×{cols}", interleaved.name());
            let (mut a, mut b) = (vec![0f32; rows * cols], vec![0f32; rows * cols]);
            dequantize_from(row_major, &bytes, &mut a);
            dequantize_rows(interleaved, &mixed, cols, &mut b);
            assert_eq!(
                a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                b.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
        }
    }

    /// ggml's reference rounding: the value of largest magnitude maps to
    /// level 0 (−16), and every value comes back within half a step (the
    /// other end, +16, is clipped at 15: a whole step there).
    #[test]
    fn q5s_round_trip_stays_within_half_a_step() {
        let x: Vec<f32> =
            (0..GROUP * 8).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0 * (1 + i / GROUP) as f32).collect();
        let mut bytes = vec![0u8; Encoding::Q5S.bytes_for(x.len())];
        quantize_into(Encoding::Q5S, &x, &mut bytes);
        let mut y = vec![0f32; x.len()];
        dequantize_from(Encoding::Q5S, &bytes, &mut y);
        let blocks: Vec<BlockQ5S> = pod_blocks(&bytes);
        for ((block_x, block_y), block) in x.chunks(GROUP).zip(y.chunks(GROUP)).zip(&blocks) {
            let extreme = block_x.iter().fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
            let at = block_x.iter().position(|&v| v == extreme).unwrap();
            assert_eq!(block.level(at), 0);
            let step = extreme.abs() / 16.0;
            for (a, b) in block_x.iter().zip(block_y) {
                let bound = if (a / extreme) < -15.5 / 16.0 { step } else { step * 0.5 };
                assert!((a - b).abs() <= bound * 1.01 + 1e-6, "{a} vs {b} (step {step})");
            }
        }
        // A zero block stays zero.
        let mut zero = [BlockQ5S::zeroed()];
        quantize_q5s(&[0.0; GROUP], &mut zero);
        let mut back = [1f32; GROUP];
        dequantize_q5s(&zero, &mut back);
        assert!(back.iter().all(|&v| v == 0.0));
    }

    /// Where the bytes go, and back: any bytes (every field, any value)
    /// come back byte for byte from the interleaved blocks; the nibbles are
    /// moved as Q4S's, the fifth bits transposed and flipped.
    #[test]
    fn q5sx4_interleaving_is_lossless_and_transposes_the_fifth_bits() {
        let mut seed = 0x5EED_0005u32;
        check_interleaving_is_lossless(Encoding::Q5S, Encoding::Q5SX4, &mut seed);
        let rows: [BlockQ5S; 4] = std::array::from_fn(|r| {
            let mut block: BlockQ5S = bytemuck::pod_read_unaligned(&random_bytes(&mut seed, 22));
            block.qs = std::array::from_fn(|i| (16 * r + i) as u8);
            // Row r: only value 4c + j = 9 + r has its fifth bit set.
            block.qh = (1u32 << (9 + r)).to_le_bytes();
            block
        });
        let mixed = BlockQ5Sx4::from_rows(&rows);
        assert_eq!(&mixed.qs[..8], &[0, 1, 2, 3, 16, 17, 18, 19]);
        assert_eq!(mixed.d, rows.map(|b| b.d));
        // Value 9 + r is column group c = (9 + r) / 4, j = (9 + r) % 4:
        // byte 4r + j has every bit (flipped) but bit c.
        for (r, row) in rows.iter().enumerate() {
            let (c, j) = ((9 + r) / 4, (9 + r) % 4);
            for jj in 0..4 {
                let expected = if jj == j { !(1u8 << c) } else { 0xFF };
                assert_eq!(mixed.qh[4 * r + jj], expected, "row {r} byte {jj}");
            }
            assert_eq!(mixed.row(r), *row);
        }
    }

    /// ggml's reference rounding: the minimum is level 0 (its f16 the
    /// block's `m`), the maximum level 31, and every value comes back within
    /// half a step plus the f16 roundings of `d` and `m`.
    #[test]
    fn q5_round_trip_stays_within_half_a_step() {
        let x: Vec<f32> = (0..GROUP * 8)
            .map(|i| ((i * 37 % 101) as f32 - 30.0) / 17.0 * (1 + i / GROUP) as f32 + (i / GROUP) as f32)
            .collect();
        let mut bytes = vec![0u8; Encoding::Q5.bytes_for(x.len())];
        quantize_into(Encoding::Q5, &x, &mut bytes);
        let mut y = vec![0f32; x.len()];
        dequantize_from(Encoding::Q5, &bytes, &mut y);
        let blocks: Vec<BlockQ5> = pod_blocks(&bytes);
        for ((block_x, block_y), block) in x.chunks(GROUP).zip(y.chunks(GROUP)).zip(&blocks) {
            let min = block_x.iter().fold(f32::INFINITY, |m, &v| m.min(v));
            let max = block_x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            assert_eq!(block.m, f16::from_f32(min));
            assert_eq!(block.level(block_x.iter().position(|&v| v == min).unwrap()), 0);
            assert_eq!(block.level(block_x.iter().position(|&v| v == max).unwrap()), 31);
            let step = (max - min) / 31.0;
            // f16's relative rounding of d (times 31 levels) and of m.
            let f16_error = 31.0 * step * 2f32.powi(-11) + min.abs() * 2f32.powi(-11);
            for (a, b) in block_x.iter().zip(block_y) {
                assert!((a - b).abs() <= step * 0.5 + f16_error + 1e-6, "{a} vs {b} (step {step})");
            }
        }
        // A constant block is its minimum, every level 0.
        let mut constant = [BlockQ5::zeroed()];
        quantize_q5(&[1.5; GROUP], &mut constant);
        let mut back = [0f32; GROUP];
        dequantize_q5(&constant, &mut back);
        assert!(back.iter().all(|&v| v == 1.5) && (0..GROUP).all(|j| constant[0].level(j) == 0));
    }

    /// Any bytes come back byte for byte from the interleaved blocks; the
    /// scales and minimums sit side by side, and the fifth bits and nibbles
    /// are laid out exactly as Q5SX4 lays out Q5_0's (one kernel text
    /// unpacks both).
    #[test]
    fn q5x4_interleaving_is_lossless_and_lays_bits_out_as_q5sx4() {
        let mut seed = 0x5EED_0051u32;
        check_interleaving_is_lossless(Encoding::Q5, Encoding::Q5X4, &mut seed);
        let rows: [BlockQ5; 4] = std::array::from_fn(|_| bytemuck::pod_read_unaligned(&random_bytes(&mut seed, 24)));
        let mixed = BlockQ5x4::from_rows(&rows);
        let symmetric = BlockQ5Sx4::from_rows(&rows.map(|b| BlockQ5S { d: b.d, qh: b.qh, qs: b.qs }));
        assert_eq!((mixed.d, mixed.m), (rows.map(|b| b.d), rows.map(|b| b.m)));
        assert_eq!((mixed.qh, mixed.qs), (symmetric.qh, symmetric.qs));
        for (r, row) in rows.iter().enumerate() {
            assert_eq!(mixed.row(r), *row);
        }
    }
}

#[cfg(test)]
mod q4b_tests {
    //! Q4B (`q4b`, `q4bx4`): Q4_1's levels with byte scales and offsets under a row scale.
    use super::*;

    /// How far a Q4B value may move from the Q4_1 value it was rounded
    /// from, in row scales `a`: the byte scale moves a level by at most
    /// 7.5 · a / 2 and the byte offset the midpoint by 16a / 2.
    const Q4B_FROM_Q4_BOUND: f32 = 3.75 + 8.0;

    fn wavy(rows: usize, cols: usize, seed: u32) -> Vec<f32> {
        let mut state = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..rows * cols)
            .map(|i| {
                state = state.wrapping_mul(1664525).wrapping_add(1013904223);
                let noise = (state >> 8) as f32 / (1u32 << 24) as f32 - 0.5;
                // Rows of very different sizes, and blocks off centre.
                let row = i / cols;
                (1.0 + row as f32 * 3.0) * (noise + 0.3 * ((i / GROUP) as f32 * 0.7).sin())
            })
            .collect()
    }

    #[test]
    fn identity_and_sizes() {
        assert_eq!((Encoding::Q4B.id(), Encoding::Q4BX4.id()), (25, 26));
        assert_eq!(Encoding::from_name("q4b"), Some(Encoding::Q4B));
        assert_eq!(Encoding::Q4B.interleaved(), Some(Encoding::Q4BX4));
        assert_eq!(Encoding::Q4BX4.row_major(), Encoding::Q4B);
        // 4.5 bits a value and one f32 a row.
        assert_eq!(Encoding::Q4B.tensor_bytes(8, 576), 8 * 4 + 8 * 576 / 32 * 18);
        assert_eq!(Encoding::Q4BX4.tensor_bytes(8, 576), Encoding::Q4B.tensor_bytes(8, 576));
        assert_eq!(Encoding::Q4.tensor_bytes(8, 576), Encoding::Q4.bytes_for(8 * 576));
    }

    #[test]
    fn rounding_from_q4_moves_each_value_at_most_the_bound() {
        let (rows, cols) = (7, 576);
        let x = wavy(rows, cols, 3);
        let mut q4 = vec![BlockQ4::zeroed(); rows * cols / GROUP];
        quantize_q4(&x, &mut q4);
        let mut bytes = vec![0u8; Encoding::Q4B.tensor_bytes(rows, cols)];
        q4b_from_q4(&q4, cols, &mut bytes);
        let (scales, _) = split_q4b(&bytes, rows * cols);
        let (mut before, mut after) = (vec![0f32; x.len()], vec![0f32; x.len()]);
        dequantize_q4(&q4, &mut before);
        dequantize_from(Encoding::Q4B, &bytes, &mut after);
        let mut moved = 0usize;
        for (r, &a) in scales.iter().enumerate() {
            assert!(a > 0.0);
            let row = r * cols..(r + 1) * cols;
            for (b, q) in before[row.clone()].iter().zip(&after[row]) {
                assert!((b - q).abs() <= Q4B_FROM_Q4_BOUND * a, "row {r}: {b} became {q} (a = {a})");
                moved += (b != q) as usize;
            }
        }
        // Not a copy: the scales were rounded, and most values moved a little.
        assert!(moved > x.len() / 2, "{moved} of {} values moved", x.len());
    }

    #[test]
    fn q4_blocks_on_the_grid_are_kept_exactly() {
        // a = 1/512, set by block 5's offset of 127: the Q4_1 scales a·d and
        // minimums a·(16o − 7.5d) below are exact in f16.
        let a = 1.0 / 512.0;
        let blocks: Vec<BlockQ4> = (0..18)
            .map(|i| {
                let (d, o) = (2.0 * (i + 1) as f32, (i * 3) as f32 - 20.0);
                let (d, o) = if i == 5 { (2.0, 127.0) } else { (d, o) };
                BlockQ4 {
                    d: f16::from_f32(a * d),
                    m: f16::from_f32(a * (16.0 * o - 7.5 * d)),
                    qs: std::array::from_fn(|j| (j * 7 + i) as u8),
                }
            })
            .collect();
        let mut bytes = vec![0u8; Encoding::Q4B.tensor_bytes(1, 18 * GROUP)];
        q4b_from_q4(&blocks, 18 * GROUP, &mut bytes);
        let (scales, q4b) = split_q4b(&bytes, 18 * GROUP);
        assert_eq!(scales, [a]);
        let (mut before, mut after) = (vec![0f32; 18 * GROUP], vec![0f32; 18 * GROUP]);
        dequantize_q4(&blocks, &mut before);
        dequantize_q4b_row(scales[0], q4b, &mut after);
        assert_eq!(before, after);
        assert!(q4b.iter().zip(&blocks).all(|(b, q)| b.qs == q.qs));
    }

    #[test]
    fn constant_and_zero_rows() {
        let cols = 64;
        // A zero row: scale 0, every value 0.
        let mut bytes = vec![0xAAu8; Encoding::Q4B.tensor_bytes(2, cols)];
        let mut x = vec![0f32; 2 * cols];
        // A positive constant row: all on one side, so the offset sets the scale.
        x[cols..].fill(3.0);
        quantize_into(Encoding::Q4B, &x, &mut bytes);
        let mut back = vec![f32::NAN; 2 * cols];
        dequantize_from(Encoding::Q4B, &bytes, &mut back);
        assert!(back[..cols].iter().all(|&v| v == 0.0));
        assert!(back[cols..].iter().all(|&v| (v - 3.0).abs() < 3.0 / 127.0), "{:?}", &back[cols..cols + 4]);
    }

    #[test]
    fn interleaving_keeps_the_row_scales_in_front() {
        let (rows, cols) = (8, 96);
        let x = wavy(rows, cols, 9);
        let mut row_major = vec![0u8; Encoding::Q4B.tensor_bytes(rows, cols)];
        quantize_into(Encoding::Q4B, &x, &mut row_major);
        let mut mixed = vec![0u8; row_major.len()];
        interleave_bytes(Encoding::Q4BX4, &row_major, cols, &mut mixed);
        assert_eq!(mixed[..4 * rows], row_major[..4 * rows]);
        assert_ne!(mixed, row_major);
        let mut back = vec![0u8; row_major.len()];
        deinterleave_bytes(Encoding::Q4BX4, &mixed, cols, &mut back);
        assert_eq!(back, row_major);
        let (mut a, mut b) = (vec![0f32; x.len()], vec![0f32; x.len()]);
        dequantize_rows(Encoding::Q4B, &row_major, cols, &mut a);
        dequantize_rows(Encoding::Q4BX4, &mixed, cols, &mut b);
        assert_eq!(a, b);
    }
}

//! `y = x Wᵀ` in bf16 with f32 sums: the frozen base's products of many rows without gradients
//! (prompts, the wide steps of `eval --beam-next`) under `--bf16-prefill`, on whichever of two
//! instruction sets the CPU has.
//!
//! - AMX tiles (Intel Sapphire Rapids and later): one `tdpbf16ps` takes 16 rows × 32 bf16 of x
//!   and 32 × 16 bf16 of W and adds their products to 16 × 16 f32 sums, 16,384 FLOPs an
//!   instruction. Written with `asm!` (Rust's AMX intrinsics are unstable); Linux hands a process
//!   the tile registers only on request ([`Isa::detect`] asks once).
//! - AVX512-BF16 (AMD Zen 4 and later, Intel Cooper Lake): one `vdpbf16ps` adds, to each of 16
//!   f32 sums, the products of a pair of bf16: 64 FLOPs an instruction, where an f32 FMA does 32.
//!
//! Both read one packing of the weights: rounded to bf16 once, at load, in the tiles' layout,
//! whose rows are also the 16-output vectors of pairs that `vdpbf16ps` takes. Each call rounds x
//! to bf16 (to nearest, ties to even) into a buffer padded to whole blocks. The sums stay f32, so
//! the result is x and W rounded to bf16, multiplied exactly and summed in f32: it differs from
//! the f32 product only by the rounding of the inputs (a relative 2⁻⁹ at most each).

use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use super::skinny::LowRank;

/// Rows of a tile, and the bf16 values of a tile row (64 bytes).
const TILE_ROWS: usize = 16;
const TILE_K: usize = 32;
/// x rows and W rows (outputs) a task computes together: 2 × 2 tiles of sums; the unit the
/// weights' outputs and (AMX) the padded rows come in.
const BLOCK: usize = 2 * TILE_ROWS;
/// Outputs per AMX task: enough tasks to share out, few enough tile configurations.
const CHUNK: usize = 4 * BLOCK;

/// The instruction set the bf16 products run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Amx,
    Avx512Bf16,
}

impl Isa {
    /// The fastest this CPU has (AMX where Linux granted it), once; `None` without either.
    pub fn detect() -> Option<Isa> {
        static ISA: OnceLock<Option<Isa>> = OnceLock::new();
        *ISA.get_or_init(|| Isa::ALL.into_iter().find(|isa| isa.supported()))
    }

    const ALL: [Isa; 2] = [Isa::Amx, Isa::Avx512Bf16];

    pub fn name(self) -> &'static str {
        match self {
            Isa::Amx => "amx-bf16",
            Isa::Avx512Bf16 => "avx512-bf16",
        }
    }

    /// Whether this CPU (and, for AMX, Linux) lets this process run it.
    fn supported(self) -> bool {
        match self {
            Isa::Amx => amx_granted(),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Bf16 => std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bf16"),
            #[cfg(not(target_arch = "x86_64"))]
            Isa::Avx512Bf16 => false,
        }
    }

    /// The rows x is padded to: whole tiles for AMX, whole kernels for AVX512-BF16.
    fn row_block(self) -> usize {
        match self {
            Isa::Amx => BLOCK,
            Isa::Avx512Bf16 => DP_ROWS,
        }
    }
}

/// Whether this CPU has AMX-BF16 and Linux granted this process the tile registers (asked once).
fn amx_granted() -> bool {
    static AMX: OnceLock<bool> = OnceLock::new();
    *AMX.get_or_init(detect_amx)
}

#[cfg(target_arch = "x86_64")]
fn detect_amx() -> bool {
    // CPUID leaf 7: EDX bit 22 is AMX-BF16, bit 24 AMX-TILE.
    let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
    if edx & (1 << 22) == 0 || edx & (1 << 24) == 0 {
        return false;
    }
    #[cfg(target_os = "linux")]
    {
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
    }
    #[cfg(not(target_os = "linux"))]
    false
}

#[cfg(not(target_arch = "x86_64"))]
fn detect_amx() -> bool {
    false
}

/// f32 to bf16, rounded to nearest with ties to even (what `vcvtneps2bf16` does); NaN stays NaN.
pub fn to_bf16(x: f32) -> u16 {
    // Both computed and one selected: no branch, so a loop of them vectorises.
    let b = x.to_bits();
    let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16;
    let quiet_nan = (b >> 16) | 0x40;
    (if x.is_nan() { quiet_nan } else { rounded }) as u16
}

/// A frozen (out, in) weight rounded to bf16 in the tiles' layout: for each 16 outputs, for each
/// 32 inputs, a 16 × 16 tile of pairs whose row p holds, for each output, its weights at inputs
/// 2p and 2p + 1 (the layout `tdpbf16ps` reads its second operand in).
#[derive(Debug, Clone)]
pub struct PackedBf16 {
    out: usize,
    inp: usize,
    data: Vec<u16>,
}

impl PackedBf16 {
    /// Packs a contiguous f32 (out, in) CPU weight; `None` for any other, and unless the outputs
    /// are a multiple of 32 and the inputs of 32.
    pub fn pack(w: &Tensor) -> candle_core::Result<Option<Self>> {
        let (out, inp) = w.dims2()?;
        if out % BLOCK != 0 || inp % TILE_K != 0 || out == 0 || inp == 0 {
            return Ok(None);
        }
        let (storage, layout) = w.storage_and_layout();
        let Some(w) = f32_in_place(&storage, layout) else { return Ok(None) };
        let mut data = vec![0u16; out * inp];
        let tile = TILE_ROWS * TILE_K;
        data.par_chunks_mut(inp * TILE_ROWS).enumerate().for_each(|(nb, outputs)| {
            for (kb, tile_data) in outputs.chunks_mut(tile).enumerate() {
                for p in 0..TILE_ROWS {
                    for c in 0..TILE_ROWS {
                        let row = &w[(nb * TILE_ROWS + c) * inp + kb * TILE_K + 2 * p..];
                        tile_data[p * TILE_K + 2 * c] = to_bf16(row[0]);
                        tile_data[p * TILE_K + 2 * c + 1] = to_bf16(row[1]);
                    }
                }
            }
        });
        Ok(Some(PackedBf16 { out, inp, data }))
    }

    /// (out, in).
    pub fn dims(&self) -> (usize, usize) {
        (self.out, self.inp)
    }

    pub fn bytes(&self) -> usize {
        self.data.len() * 2
    }

    /// The tiles of outputs `16 nb ..`, over all inputs: row p of them holds the weights at
    /// inputs 2p and 2p + 1.
    fn group(&self, nb: usize) -> *const u16 {
        self.data[nb * self.inp * TILE_ROWS..].as_ptr()
    }

    /// The tiles of outputs `16 nb ..` over inputs `32 kb ..`.
    fn tile(&self, nb: usize, kb: usize) -> *const u16 {
        self.data[(nb * (self.inp / TILE_K) + kb) * TILE_ROWS * TILE_K..].as_ptr()
    }
}

/// The values of a contiguous f32 CPU tensor, read in place (a copy of the output projection
/// would add its 113 MB to the peak, and a copy of the rows is a pass over them for nothing);
/// `None` for any other tensor.
fn f32_in_place<'s>(storage: &'s candle_core::Storage, layout: &candle_core::Layout) -> Option<&'s [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(all)), Some((start, end))) => Some(&all[start..end]),
        _ => None,
    }
}

/// The output, written by tasks at disjoint blocks.
struct Out(*mut f32);
unsafe impl Sync for Out {}

/// `x` (rows, in), f32 on the CPU, times `w` transposed: (rows, out) f32, plus the adapter's
/// `scale (x Aᵀ) Bᵀ` where given, in f32: its rank-r product of x is computed beside the
/// rounding of x, and its terms are added to each block of the result. On [`Isa::detect`]'s
/// instruction set; an error without one.
pub fn matmul_wt(x: &Tensor, w: &PackedBf16, adapter: Option<LowRank>) -> candle_core::Result<Tensor> {
    let Some(isa) = Isa::detect() else {
        candle_core::bail!("bf16 products: this CPU has neither AMX-BF16 (granted by Linux) nor AVX512-BF16");
    };
    matmul_wt_on(isa, x, w, adapter)
}

/// [`matmul_wt`] on `isa`, which must be supported.
fn matmul_wt_on(isa: Isa, x: &Tensor, w: &PackedBf16, adapter: Option<LowRank>) -> candle_core::Result<Tensor> {
    assert!(isa.supported(), "{} is not supported here", isa.name());
    if !matches!(x.device(), Device::Cpu) || x.dtype() != DType::F32 {
        candle_core::bail!("bf16 products take f32 rows on the CPU");
    }
    let (m, k) = x.dims2()?;
    if k != w.inp {
        candle_core::bail!("bf16 products: rows of {k} against a weight of {:?}", w.dims());
    }
    let n = w.out;
    let m_pad = m.div_ceil(isa.row_block()) * isa.row_block();
    let factors = match adapter {
        Some(f) => {
            let ((r, ak), (bo, br)) = (f.a.dims2()?, f.b.dims2()?);
            if ak != k || bo != n || br != r {
                candle_core::bail!("bf16 products: an adapter of {:?} and {:?} for ({m}, {k}) × ({n}, {k})ᵀ", f.a.dims(), f.b.dims());
            }
            let a = f.a.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            let bt = f.b.to_dtype(DType::F32)?.t()?.flatten_all()?.to_vec1::<f32>()?;
            Some((r, a, bt, f.scale as f32))
        }
        None => None,
    };
    let r = factors.as_ref().map_or(0, |f| f.0);
    // x rounded to bf16, and the adapter's rank-r product of x, by blocks of rows in parallel (a
    // product of r outputs left to candle ran on one thread while the other waited), both padded
    // to whole kernels with zeros. `a` is not zeroed first: every element is written below.
    let mut a: Vec<u16> = Vec::with_capacity(m_pad * k);
    let mut low = vec![0f32; m_pad * r.max(1)];
    {
        let x = x.contiguous()?;
        let (storage, layout) = x.storage_and_layout();
        let x = f32_in_place(&storage, layout).expect("a contiguous f32 CPU tensor");
        let (rounded, pad) = a.spare_capacity_mut()[..m_pad * k].split_at_mut(m * k);
        pad.iter_mut().for_each(|d| _ = d.write(0));
        // One chunk of `low` for each block of rows (a dummy one without an adapter).
        let low_rows = low.par_chunks_mut(r.max(1) * BLOCK);
        rounded.par_chunks_mut(k * BLOCK).zip(x.par_chunks(k * BLOCK)).zip(low_rows).for_each(|((dst, src), low)| {
            dst.iter_mut().zip(src).for_each(|(d, &s)| _ = d.write(to_bf16(s)));
            if let Some((r, a, _, scale)) = &factors {
                let rows = src.len() / k;
                // dot_block writes (r, rows); `low` is (rows, r).
                let mut by_factor = vec![0f32; r * rows];
                super::skinny::dot_block(src, rows, a, k, &mut by_factor);
                for (i, low) in low.chunks_exact_mut(*r).take(rows).enumerate() {
                    low.iter_mut().enumerate().for_each(|(j, l)| *l = scale * by_factor[j * rows + i]);
                }
            }
        });
    }
    // Safety: the m rows were rounded into `a` and the rows up to m_pad zeroed, above.
    unsafe { a.set_len(m_pad * k) };
    let adapter = factors.map(|(r, _, bt, _)| AdapterTerms { r, low, bt });
    // Every (row, output) is written below by exactly one task: no need to zero it first.
    let mut y: Vec<f32> = Vec::with_capacity(m * n);
    let out = Out(y.as_mut_ptr());
    let chunk = match isa {
        Isa::Amx => CHUNK,
        Isa::Avx512Bf16 => DP_CHUNK,
    };
    let chunks = n.div_ceil(chunk);
    (0..m.div_ceil(BLOCK) * chunks).into_par_iter().for_each(|task| {
        let (mb, c) = (task / chunks, task % chunks);
        let outputs = c * chunk..(c * chunk + chunk).min(n);
        let rows = mb * BLOCK..((mb + 1) * BLOCK).min(m);
        // Safety: `isa` is supported; the task writes only `rows` of columns `outputs`, which
        // no other task writes; `a` holds whole row blocks of `isa` and `w` whole tiles.
        match isa {
            Isa::Avx512Bf16 => unsafe { dp_block(&a, k, rows.clone(), w, outputs.clone(), &out, n, adapter.as_ref()) },
            Isa::Amx => unsafe { amx_block(&a, k, mb, w, outputs.clone(), &out, m, n) },
        }
        // The tiles' sums leave the registers as whole tiles: the adapter's terms follow.
        if let (Isa::Amx, Some(lr)) = (isa, &adapter) {
            for row in rows {
                // Safety: the same rows and columns, written by this task alone.
                let y = unsafe { std::slice::from_raw_parts_mut(out.0.add(row * n + outputs.start), outputs.len()) };
                for (j, &l) in lr.low[row * lr.r..(row + 1) * lr.r].iter().enumerate() {
                    y.iter_mut().zip(&lr.bt[j * n + outputs.start..j * n + outputs.end]).for_each(|(y, &b)| *y += l * b);
                }
            }
        }
    });
    // Safety: the tasks above cover rows 0..m and outputs 0..n (whole 32-wide blocks, as `w` is
    // packed), each element stored once.
    unsafe { y.set_len(m * n) };
    Tensor::from_vec(y, (m, n), &Device::Cpu)
}

/// An adapter's rank-r terms: `low` (rows, r) row-major, `bt` its B transposed, (r, out).
struct AdapterTerms {
    r: usize,
    low: Vec<f32>,
    bt: Vec<f32>,
}

/// On the AMX tiles: the sums of x rows `32 mb ..` (32 rows of `a`, k wide) with outputs
/// `outputs` (whole 32-wide blocks), written to rows `< m` of the (m, n) output.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn amx_block(a: &[u16], k: usize, mb: usize, w: &PackedBf16, outputs: std::ops::Range<usize>, out: &Out, m: usize, n: usize) {
    use std::arch::asm;
    // Palette 1, every tile 16 rows of 64 bytes.
    #[repr(C, align(64))]
    struct Config([u8; 64]);
    let mut config = Config([0; 64]);
    config.0[0] = 1;
    for t in 0..8 {
        config.0[16 + 2 * t] = 64;
        config.0[48 + t] = TILE_ROWS as u8;
    }
    let a0 = a[mb * BLOCK * k..].as_ptr();
    let a1 = a[(mb * BLOCK + TILE_ROWS) * k..].as_ptr();
    let full = (mb + 1) * BLOCK <= m;
    let mut scratch = [0f32; BLOCK * BLOCK];
    unsafe {
        asm!("ldtilecfg [{0}]", in(reg) config.0.as_ptr(), options(nostack));
        for n0 in outputs.step_by(BLOCK) {
            let nb = n0 / TILE_ROWS;
            asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
            for kb in 0..k / TILE_K {
                // tmm4, tmm5: x rows 0-15 and 16-31; tmm6, tmm7: outputs 0-15 and 16-31.
                asm!(
                    "tileloadd tmm4, [{a0} + {sa}]",
                    "tileloadd tmm5, [{a1} + {sa}]",
                    "tileloadd tmm6, [{b0} + {sb}]",
                    "tileloadd tmm7, [{b1} + {sb}]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    a0 = in(reg) a0.add(kb * TILE_K),
                    a1 = in(reg) a1.add(kb * TILE_K),
                    sa = in(reg) k * 2,
                    b0 = in(reg) w.tile(nb, kb),
                    b1 = in(reg) w.tile(nb + 1, kb),
                    sb = in(reg) TILE_K * 2,
                    options(nostack, readonly),
                );
            }
            // Whole blocks go straight to the output; the last, partial one through scratch.
            let (dst, stride) = if full { (out.0.add(mb * BLOCK * n + n0), n) } else { (scratch.as_mut_ptr(), BLOCK) };
            asm!(
                "tilestored [{c0} + {s}], tmm0",
                "tilestored [{c1} + {s}], tmm1",
                "tilestored [{c2} + {s}], tmm2",
                "tilestored [{c3} + {s}], tmm3",
                c0 = in(reg) dst,
                c1 = in(reg) dst.add(TILE_ROWS),
                c2 = in(reg) dst.add(TILE_ROWS * stride),
                c3 = in(reg) dst.add(TILE_ROWS * stride + TILE_ROWS),
                s = in(reg) stride * 4,
                options(nostack),
            );
            if !full {
                for r in 0..m - mb * BLOCK {
                    std::ptr::copy_nonoverlapping(scratch.as_ptr().add(r * BLOCK), out.0.add((mb * BLOCK + r) * n + n0), BLOCK);
                }
            }
        }
        asm!("tilerelease", options(nostack, nomem));
    }
}

/// x rows and 16-output groups of one AVX512-BF16 kernel: 24 sums and 3 weight vectors fill 27
/// of the 32 vector registers.
const DP_ROWS: usize = 8;
const DP_GROUPS: usize = 3;
/// Outputs per AVX512-BF16 task: two kernels wide.
const DP_CHUNK: usize = 2 * DP_GROUPS * TILE_ROWS;

/// With AVX512-BF16: the sums of x `rows` (of `a`, k wide, padded to whole kernels) with
/// `outputs` (whole 16-output groups), plus the adapter's terms where given, written to the
/// (·, n) output. Each weight group is read once for every 8 rows, from cache: a task's groups
/// take 96 bytes an input pair.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn dp_block(
    a: &[u16],
    k: usize,
    rows: std::ops::Range<usize>,
    w: &PackedBf16,
    outputs: std::ops::Range<usize>,
    out: &Out,
    n: usize,
    adapter: Option<&AdapterTerms>,
) {
    let groups = outputs.start / TILE_ROWS..outputs.end / TILE_ROWS;
    for g0 in groups.clone().step_by(DP_GROUPS) {
        let (width, group) = ((groups.end - g0).min(DP_GROUPS), w.group(g0));
        for r0 in rows.clone().step_by(DP_ROWS) {
            let (x, valid) = (a[r0 * k..].as_ptr(), (rows.end - r0).min(DP_ROWS));
            let low = adapter.map(|lr| (lr.low[r0 * lr.r..].as_ptr(), lr.r, lr.bt[g0 * TILE_ROWS..].as_ptr()));
            // Safety: the caller's; rows r0.. of `a` (and of the adapter's `low`) are whole
            // kernels, the outputs whole groups.
            unsafe {
                let y = out.0.add(r0 * n + g0 * TILE_ROWS);
                match width {
                    3 => dp_kernel::<3>(x, k, group, y, n, valid, low),
                    2 => dp_kernel::<2>(x, k, group, y, n, valid, low),
                    _ => dp_kernel::<1>(x, k, group, y, n, valid, low),
                }
            }
        }
    }
}

/// 8 rows of x (from `x`, k wide) times `G` consecutive 16-output groups of packed weights (from
/// `w`), the first `valid` rows' sums stored at `y` (row stride n). Row p of a group's tiles
/// holds each output's weights at inputs 2p and 2p + 1: one vector for `vdpbf16ps` against the
/// pair of x at the same inputs, broadcast. With `low` = (the adapter's rank-r rows at x's first
/// row, r, its Bᵀ (r, n) at the first output), the rank-r terms are added in f32 while the sums
/// are still in registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn dp_kernel<const G: usize>(
    x: *const u16,
    k: usize,
    w: *const u16,
    y: *mut f32,
    n: usize,
    valid: usize,
    low: Option<(*const f32, usize, *const f32)>,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); G]; DP_ROWS];
    let group_stride = k * TILE_ROWS;
    for p in 0..k / 2 {
        let mut b = [_mm512_setzero_si512(); G];
        for (g, b) in b.iter_mut().enumerate() {
            *b = unsafe { _mm512_loadu_si512(w.add(g * group_stride + p * TILE_K).cast()) };
        }
        for (r, acc) in acc.iter_mut().enumerate() {
            let pair = unsafe { x.add(r * k + 2 * p).cast::<i32>().read_unaligned() };
            // Safety: both are 64 bytes of plain bits.
            let pair: __m512bh = unsafe { std::mem::transmute(_mm512_set1_epi32(pair)) };
            for (acc, &b) in acc.iter_mut().zip(&b) {
                *acc = _mm512_dpbf16_ps(*acc, pair, unsafe { std::mem::transmute::<__m512i, __m512bh>(b) });
            }
        }
    }
    if let Some((low, rank, bt)) = low {
        for j in 0..rank {
            let mut b = [_mm512_setzero_ps(); G];
            for (g, b) in b.iter_mut().enumerate() {
                *b = unsafe { _mm512_loadu_ps(bt.add(j * n + g * TILE_ROWS)) };
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let l = _mm512_set1_ps(unsafe { *low.add(r * rank + j) });
                for (acc, &b) in acc.iter_mut().zip(&b) {
                    *acc = _mm512_fmadd_ps(l, b, *acc);
                }
            }
        }
    }
    for (r, acc) in acc.iter().enumerate().take(valid) {
        for (g, &acc) in acc.iter().enumerate() {
            unsafe { _mm512_storeu_ps(y.add(r * n + g * TILE_ROWS), acc) };
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn amx_block(_: &[u16], _: usize, _: usize, _: &PackedBf16, _: std::ops::Range<usize>, _: &Out, _: usize, _: usize) {
    unreachable!("no instruction set is supported off x86-64")
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn dp_block(
    _: &[u16],
    _: usize,
    _: std::ops::Range<usize>,
    _: &PackedBf16,
    _: std::ops::Range<usize>,
    _: &Out,
    _: usize,
    _: Option<&AdapterTerms>,
) {
    unreachable!("no instruction set is supported off x86-64")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from_bf16(b: u16) -> f64 {
        f64::from(f32::from_bits(u32::from(b) << 16))
    }

    #[test]
    fn rounding_to_bf16_is_to_nearest_ties_to_even() {
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1).
        assert_eq!(to_bf16(1.0 + 2f32.powi(-8)), 0x3f80);
        // 1 + 3·2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6: it goes up.
        assert_eq!(to_bf16(1.0 + 3.0 * 2f32.powi(-8)), 0x3f82);
        assert_eq!(to_bf16(1.0 + 2f32.powi(-8) + 2f32.powi(-20)), 0x3f81);
        assert_eq!(to_bf16(-2.5), 0xc020);
        assert_eq!(to_bf16(f32::INFINITY), 0x7f80);
        assert_eq!(to_bf16(f32::MAX), 0x7f80, "beyond bf16's largest value rounds to infinity");
        assert!(f32::from_bits(u32::from(to_bf16(f32::NAN)) << 16).is_nan());
        assert_eq!(to_bf16(-0.0), 0x8000);
    }

    #[test]
    fn only_whole_tiles_are_packed() -> candle_core::Result<()> {
        let w = |o, i| Tensor::zeros((o, i), DType::F32, &Device::Cpu);
        assert!(PackedBf16::pack(&w(64, 96)?)?.is_some());
        assert!(PackedBf16::pack(&w(48, 96)?)?.is_none(), "outputs come in blocks of 32");
        assert!(PackedBf16::pack(&w(64, 80)?)?.is_none(), "inputs come in tiles of 32");
        Ok(())
    }

    /// On each instruction set this CPU has, the sums are those of the bf16-rounded inputs, plus
    /// an adapter's `scale (x Aᵀ) Bᵀ` in f32 where given, to f32 rounding: compared with the same
    /// products summed in f64 (the portable reference), within the bound of the f32 additions
    /// (k for the bf16 sums, k + r for the adapter's). The shapes cover partial row blocks, a
    /// single remaining output group, and rows beyond one kernel and one task. Counted as
    /// skipped on CPUs with neither.
    #[test]
    fn each_isa_sums_the_bf16_inputs_in_f32() -> candle_core::Result<()> {
        let isas: Vec<Isa> = Isa::ALL.into_iter().filter(|isa| isa.supported()).collect();
        if isas.is_empty() {
            eprintln!("skipped: this CPU has neither AMX-BF16 nor AVX512-BF16");
            return Ok(());
        }
        let dev = Device::Cpu;
        for (m, k, n, r) in [(1, 32, 32, 0), (17, 96, 64, 3), (45, 576, 192, 8), (64, 64, 160, 0), (9, 64, 224, 2), (70, 64, 96, 1)] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
            let (a, b, scale) = (Tensor::randn(0f32, 1.0, (r, k), &dev)?, Tensor::randn(0f32, 1.0, (n, r), &dev)?, 0.75);
            let packed = PackedBf16::pack(&w)?.expect("whole tiles");
            let (xs, ws, b_rows) = (x.to_vec2::<f32>()?, w.to_vec2::<f32>()?, b.to_vec2::<f32>()?);
            let a_rows = a.to_vec2::<f32>()?;
            for &isa in &isas {
                let lora = (r > 0).then_some(LowRank { a: &a, b: &b, scale });
                let y = matmul_wt_on(isa, &x, &packed, lora)?.to_vec2::<f32>()?;
                for i in 0..m {
                    // The adapter's rank-r product of row i, and the sum of its terms' sizes.
                    let low: Vec<(f64, f64)> = a_rows
                        .iter()
                        .map(|a_t| {
                            let terms = xs[i].iter().zip(a_t).map(|(&x, &a)| scale * f64::from(x) * f64::from(a));
                            terms.fold((0.0, 0.0), |(sum, size), t| (sum + t, size + t.abs()))
                        })
                        .collect();
                    for j in 0..n {
                        let products: f64 = (0..k).map(|t| from_bf16(to_bf16(xs[i][t])) * from_bf16(to_bf16(ws[j][t]))).sum();
                        let product_size: f64 = (0..k).map(|t| (from_bf16(to_bf16(xs[i][t])) * from_bf16(to_bf16(ws[j][t]))).abs()).sum();
                        let adapter: f64 = low.iter().zip(&b_rows[j]).map(|(&(l, _), &b)| l * f64::from(b)).sum();
                        let adapter_size: f64 = low.iter().zip(&b_rows[j]).map(|(&(_, size), &b)| size * f64::from(b).abs()).sum();
                        let exact = products + adapter;
                        let bound = f64::from(f32::EPSILON) * (k as f64 * product_size + (k + r + 1) as f64 * adapter_size) + 1e-30;
                        let err = (f64::from(y[i][j]) - exact).abs();
                        assert!(err <= bound, "{} ({m}, {k}, {n}, r {r}) at ({i}, {j}): {} against {exact}", isa.name(), y[i][j]);
                    }
                }
            }
        }
        Ok(())
    }
}

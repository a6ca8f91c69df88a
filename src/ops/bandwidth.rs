//! The machine's memory read bandwidth: the ceiling of bandwidth-bound decode.
//! A streaming read of a buffer much larger than the caches, one slice per thread,
//! with the widest loads the CPU has.

use std::time::Instant;

use rayon::prelude::*;

use super::kernels::Isa;

/// Median of `passes` timed reads of a `bytes`-sized buffer on the current rayon
/// pool, in GB/s (1e9 bytes per second). The median, not the best: on a shared
/// virtual machine single passes burst to 1.5x the rate that a minute of decoding
/// sees, which would understate every share of it.
pub fn measure_read_gbs(bytes: usize, passes: usize) -> f64 {
    let words = (bytes / 8).max(1 << 10);
    // Written first, so every page is resident before timing.
    let buf: Vec<u64> = (0..words as u64).collect();
    let threads = rayon::current_num_threads().max(1);
    let per = words.div_ceil(threads);
    let isa = Isa::best();
    let mut rates = Vec::with_capacity(passes.max(1));
    for _ in 0..passes.max(1) {
        let start = Instant::now();
        let sum: u64 = buf
            .par_chunks(per)
            .map(|c| read_sum(isa, c))
            .reduce(|| 0, u64::wrapping_add);
        let secs = start.elapsed().as_secs_f64();
        std::hint::black_box(sum);
        rates.push((words * 8) as f64 / secs / 1e9);
    }
    rates.sort_by(f64::total_cmp);
    rates[rates.len() / 2]
}

fn read_sum(isa: Isa, words: &[u64]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 {
        // SAFETY: `Isa::Avx512` is only produced when the CPU has AVX-512 F.
        return unsafe { read_sum_avx512(words) };
    }
    let _ = isa;
    words.iter().fold(0u64, |a, &w| a ^ w)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn read_sum_avx512(words: &[u64]) -> u64 {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_setzero_si512(); 4];
    let main = words.len() / 32 * 32;
    let p = words.as_ptr();
    let mut i = 0;
    while i < main {
        for (j, a) in acc.iter_mut().enumerate() {
            // SAFETY: `i + 8 * j + 8 <= main <= words.len()`.
            let v = unsafe { _mm512_loadu_si512(p.add(i + 8 * j) as *const __m512i) };
            *a = _mm512_xor_si512(*a, v);
        }
        i += 32;
    }
    let v = _mm512_xor_si512(
        _mm512_xor_si512(acc[0], acc[1]),
        _mm512_xor_si512(acc[2], acc[3]),
    );
    let mut lanes = [0u64; 8];
    // SAFETY: `lanes` is 64 bytes.
    unsafe { _mm512_storeu_si512(lanes.as_mut_ptr() as *mut __m512i, v) };
    lanes.iter().chain(&words[main..]).fold(0u64, |a, &w| a ^ w)
}

#[cfg(test)]
mod tests {
    #[test]
    fn bandwidth_is_positive() {
        assert!(super::measure_read_gbs(1 << 20, 1) > 0.0);
    }
}

// Counter-based random numbers shared by the CPU (g++) and CUDA (NVRTC) kernels.
//
// Philox4x32-10 (Salmon et al., SC'11) maps a 128-bit counter and a 64-bit key to 128 random
// bits. Every random number in this library is a pure function of
//     key     = seed (64 bits, with the high halves of stream and offset folded in)
//     counter = (index | domain << 30, row, low32(offset), low32(stream))
// so the output does not depend on how work is split between threads or GPU blocks.
//
// This header must compile both as C++ and under NVRTC (no standard headers there), so it only
// uses built-in integer types and sqrt (the includer provides <cmath> on the host).
#pragma once

#ifdef __CUDACC_RTC__
#define FP_HD __device__ __forceinline__
#else
#define FP_HD inline __attribute__((always_inline))
#endif

namespace fp {

typedef unsigned int u32;
typedef unsigned long long u64;

// Counter domains (top two bits of counter word 0) keep the draws of different purposes apart.
enum { DOM_NORMAL = 0u, DOM_UNIFORM = 1u, DOM_SELECT = 2u };

struct Key {
  u32 k0, k1;  // Philox key
  u32 c2, c3;  // counter words 2 and 3: low halves of offset and stream
};

struct U4 {
  u32 x, y, z, w;
};

FP_HD u32 mulhilo(u32 a, u32 b, u32* hi) {
  u64 p = (u64)a * (u64)b;
  *hi = (u32)(p >> 32);
  return (u32)p;
}

// One Philox round: two 32x32->64 multiplies and a Feistel-like shuffle, then bump the key.
FP_HD void philox_round(u32& c0, u32& c1, u32& c2, u32& c3, u32& k0, u32& k1) {
  u32 hi0, hi1;
  const u32 lo0 = mulhilo(0xD2511F53u, c0, &hi0);
  const u32 lo1 = mulhilo(0xCD9E8D57u, c2, &hi1);
  c0 = hi1 ^ c1 ^ k0;
  c1 = lo1;
  c2 = hi0 ^ c3 ^ k1;
  c3 = lo0;
  k0 += 0x9E3779B9u;  // Weyl sequence key schedule
  k1 += 0xBB67AE85u;
}

// Philox4x32-10 (constants from Random123), written out so that vectorizers see straight code.
FP_HD U4 philox(u32 c0, u32 c1, u32 c2, u32 c3, u32 k0, u32 k1) {
  philox_round(c0, c1, c2, c3, k0, k1);
  philox_round(c0, c1, c2, c3, k0, k1);
  philox_round(c0, c1, c2, c3, k0, k1);
  philox_round(c0, c1, c2, c3, k0, k1);
  philox_round(c0, c1, c2, c3, k0, k1);
  philox_round(c0, c1, c2, c3, k0, k1);
  philox_round(c0, c1, c2, c3, k0, k1);
  philox_round(c0, c1, c2, c3, k0, k1);
  philox_round(c0, c1, c2, c3, k0, k1);
  philox_round(c0, c1, c2, c3, k0, k1);
  U4 out = {c0, c1, c2, c3};
  return out;
}

// Key for one call. The high halves of stream and offset are mixed into the key (zero for every
// realistic stream/offset, in which case the key is exactly the seed).
FP_HD Key make_key(u64 seed, u64 stream, u64 offset) {
  Key k;
  k.k0 = (u32)seed ^ ((u32)(stream >> 32) * 0x85EBCA6Bu);
  k.k1 = (u32)(seed >> 32) ^ ((u32)(offset >> 32) * 0xC2B2AE35u);
  k.c2 = (u32)offset;
  k.c3 = (u32)stream;
  return k;
}

FP_HD U4 block(const Key& k, u32 domain, u32 index, u32 row) {
  return philox(index | (domain << 30), row, k.c2, k.c3, k.k0, k.k1);
}

// Uniform in the open interval (0, 1) from 64 random bits: u = (2m + 1) 2^-53 with m the top 52
// bits. Every value is exact, the smallest is 2^-53 and the largest 1 - 2^-53. It is built as
// (1 + m 2^-52) - 1 + 2^-53 from the bit pattern (no integer-to-double conversion, which SIMD
// units lack for 64-bit integers).
FP_HD double double_of(u64 b);
FP_HD double uniform_open(u32 hi, u32 lo) {
  const u64 m = (((u64)hi << 32) | lo) >> 12;
  return (double_of(0x3FF0000000000000ull | m) - 1.0) + 1.1102230246251565404e-16;  // + 2^-53
}

// ---- elementary functions from +, -, *, / and sqrt only --------------------------------------
// IEEE-754 rounds these identically on every CPU and GPU (with FMA contraction disabled), so the
// normals are bit-identical across machines, instruction sets and devices, and the loops vectorize.

FP_HD u64 bits_of(double x) {
#ifdef __CUDACC_RTC__
  return (u64)__double_as_longlong(x);
#else
  u64 b;
  __builtin_memcpy(&b, &x, sizeof b);
  return b;
#endif
}

FP_HD double double_of(u64 b) {
#ifdef __CUDACC_RTC__
  return __longlong_as_double((long long)b);
#else
  double x;
  __builtin_memcpy(&x, &b, sizeof x);
  return x;
#endif
}

// Natural log of a positive normal double: x = 2^e m with m in [sqrt(1/2), sqrt(2)), and
// log m = 2 atanh(s) = 2 (s + s^3/3 + ... + s^23/23), s = (m - 1)/(m + 1), |s| < 0.1716
// (truncation error < 1e-19 relative). ln 2 is split into an exact high part and a low part.
FP_HD double log_pos(double x) {
  // Branch-free reduction: adding (1.0 - sqrt(1/2)) in bit space carries into the exponent
  // exactly when the mantissa is >= sqrt(2); the exponent field then is that of 2^e.
  const u64 ix = bits_of(x) + (0x3FF0000000000000ull - 0x3FE6A09E667F3BCDull);
  const double m = double_of((ix & 0x000FFFFFFFFFFFFFull) + 0x3FE6A09E667F3BCDull);  // [sqrt(1/2), sqrt(2))
  // e as a double without an integer conversion: (2^52 + field) - 2^52 - 1023
  const double e = (double_of(0x4330000000000000ull | (ix >> 52)) - 4503599627370496.0) - 1023.0;
  const double s = (m - 1.0) / (m + 1.0), s2 = s * s;
  double p = 1.0 / 23;
  p = p * s2 + 1.0 / 21;
  p = p * s2 + 1.0 / 19;
  p = p * s2 + 1.0 / 17;
  p = p * s2 + 1.0 / 15;
  p = p * s2 + 1.0 / 13;
  p = p * s2 + 1.0 / 11;
  p = p * s2 + 1.0 / 9;
  p = p * s2 + 1.0 / 7;
  p = p * s2 + 1.0 / 5;
  p = p * s2 + 1.0 / 3;
  const double ln2_hi = 6.93147180369123816490e-01, ln2_lo = 1.90821492927058770002e-10;
  return e * ln2_hi + (2.0 * s + (2.0 * s * s2 * p + e * ln2_lo));
}

// sin and cos of 2 pi t for t in [0, 1]: q = round(4t) picks the quadrant, f = t - q/4 is exact
// and |2 pi f| <= pi/4, where Taylor series to a^17 / a^16 are accurate to < 1e-16.
FP_HD void sincos_2pi(double t, double* sn, double* cs) {
  const double q = (double)(int)(4.0 * t + 0.5);
  const double a = (t - 0.25 * q) * 6.283185307179586476925, a2 = a * a;
  double ps = -1.0 / 355687428096000.0;       // -1/17!
  ps = ps * a2 + 1.0 / 1307674368000.0;        //  1/15!
  ps = ps * a2 - 1.0 / 6227020800.0;           // -1/13!
  ps = ps * a2 + 1.0 / 39916800.0;             //  1/11!
  ps = ps * a2 - 1.0 / 362880.0;               // -1/9!
  ps = ps * a2 + 1.0 / 5040.0;                 //  1/7!
  ps = ps * a2 - 1.0 / 120.0;                  // -1/5!
  ps = ps * a2 + 1.0 / 6.0;                    //  1/3!
  const double s = a - a * a2 * ps;
  double pc = 1.0 / 20922789888000.0;          //  1/16!
  pc = pc * a2 - 1.0 / 87178291200.0;          // -1/14!
  pc = pc * a2 + 1.0 / 479001600.0;            //  1/12!
  pc = pc * a2 - 1.0 / 3628800.0;              // -1/10!
  pc = pc * a2 + 1.0 / 40320.0;                //  1/8!
  pc = pc * a2 - 1.0 / 720.0;                  // -1/6!
  pc = pc * a2 + 1.0 / 24.0;                   //  1/4!
  pc = pc * a2 - 0.5;                          // -1/2!
  const double c = 1.0 + a2 * pc;
  // rotate by q quarter turns: (sin, cos) -> (cos, -sin) per quarter
  const int k = (int)q & 3;
  const double ss = (k & 1) ? c : s, cc = (k & 1) ? s : c;
  *sn = (k & 2) ? -ss : ss;
  *cs = ((k + 1) & 2) ? -cc : cc;
}

// Box-Muller: two independent N(0,1) from one Philox block (two open uniforms u1, u2):
//   r = sqrt(-2 log u1), z0 = r cos(2 pi u2), z1 = r sin(2 pi u2);  |z| <= 8.6.
FP_HD void box_muller(const U4& b, double* z0, double* z1) {
  const double r = sqrt(-2.0 * log_pos(uniform_open(b.x, b.y)));
  double s, c;
  sincos_2pi(uniform_open(b.z, b.w), &s, &c);
  *z0 = r * c;
  *z1 = r * s;
}

// The standard normal attached to element j of a row: element pair j/2 shares one Philox block.
FP_HD double normal_at(const Key& k, u32 row, u32 j) {
  double z0, z1;
  box_muller(block(k, DOM_NORMAL, j >> 1, row), &z0, &z1);
  return (j & 1u) ? z1 : z0;
}

// Uniform integer in [0, n) from 64 random bits by multiply-shift; bias <= n / 2^64.
FP_HD u32 below(u32 hi, u32 lo, u32 n) {
  u64 x = ((u64)hi << 32) | lo;
#ifdef __CUDACC_RTC__
  return (u32)__umul64hi(x, (u64)n);
#else
  return (u32)(((unsigned __int128)x * n) >> 64);
#endif
}

}  // namespace fp

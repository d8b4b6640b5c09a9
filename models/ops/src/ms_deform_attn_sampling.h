// Bilinear sampling footprint of multi-scale deformable attention, shared by the CUDA and CPU kernels.
//
// Sampling matches grid_sample(align_corners=False, padding_mode="zeros"): a location x in [0, 1] of a map W
// pixels wide sits at x_pix = x * W - 0.5, and corners off the map count as zero.
#pragma once

#include <math.h>

#include <cstdint>

#ifdef __CUDACC__
#define MSDA_INLINE __host__ __device__ __forceinline__
#else
#define MSDA_INLINE inline
#endif

namespace msda {

// Bilinear footprint of one sampling location on an H x W map.
template <typename acc_t>
struct Footprint {
  bool inside;   // false when all four corners are off the map (or the location is not finite)
  int x0, y0;    // top-left corner, may be -1
  acc_t fx, fy;  // offsets from the top-left corner in pixels, in [0, 1)
  bool x0_ok, x1_ok, y0_ok, y1_ok;  // which corner columns / rows lie on the map
};

MSDA_INLINE float floor_of(float x) { return floorf(x); }
MSDA_INLINE double floor_of(double x) { return floor(x); }

template <typename acc_t>
MSDA_INLINE Footprint<acc_t> footprint(acc_t x, acc_t y, int h, int w) {
  Footprint<acc_t> f;
  const acc_t px = x * static_cast<acc_t>(w) - static_cast<acc_t>(0.5);
  const acc_t py = y * static_cast<acc_t>(h) - static_cast<acc_t>(0.5);
  // comparisons with NaN are false, so NaN locations count as outside
  f.inside = px > static_cast<acc_t>(-1) && py > static_cast<acc_t>(-1) &&
             px < static_cast<acc_t>(w) && py < static_cast<acc_t>(h);
  const acc_t flx = f.inside ? floor_of(px) : static_cast<acc_t>(0);
  const acc_t fly = f.inside ? floor_of(py) : static_cast<acc_t>(0);
  f.x0 = static_cast<int>(flx);
  f.y0 = static_cast<int>(fly);
  f.fx = f.inside ? px - flx : static_cast<acc_t>(0);
  f.fy = f.inside ? py - fly : static_cast<acc_t>(0);
  f.x0_ok = f.x0 >= 0;
  f.x1_ok = f.x0 + 1 < w;
  f.y0_ok = f.y0 >= 0;
  f.y1_ok = f.y0 + 1 < h;
  return f;
}

// Rows of the four corners (top-left, top-right, bottom-left, bottom-right) relative to the level start.
template <typename acc_t>
MSDA_INLINE void corner_rows(const Footprint<acc_t>& f, int w, int64_t rows[4], bool ok[4]) {
  const int64_t top_left = static_cast<int64_t>(f.y0) * w + f.x0;
  rows[0] = top_left;
  rows[1] = top_left + 1;
  rows[2] = top_left + w;
  rows[3] = top_left + w + 1;
  ok[0] = f.y0_ok && f.x0_ok;
  ok[1] = f.y0_ok && f.x1_ok;
  ok[2] = f.y1_ok && f.x0_ok;
  ok[3] = f.y1_ok && f.x1_ok;
}

}  // namespace msda

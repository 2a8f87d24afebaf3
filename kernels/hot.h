/* The hot kernels as each implementation provides them (internal to kernels/). */
#ifndef SAGD_HOT_H
#define SAGD_HOT_H

#include "sagd_kernels.h"

/* An AVX2 build of hot.c exists on x86-64 with GCC or Clang. */
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__)) \
    && !defined(SAGD_NO_AVX2)
#define SAGD_HAVE_AVX2 1
#endif

#define SAGD_DECLARE_HOT(sfx)                                                               \
    void sagd_hot_random_words##sfx(const sagd_rng *, uint64_t, size_t, uint32_t *);         \
    int64_t sagd_hot_encode##sfx(int, const float *, size_t, void *, float,                   \
                                 const sagd_rng *, uint64_t);                                 \
    void sagd_hot_decode##sfx(int, const void *, size_t, float, float *);                    \
    int64_t sagd_hot_optim_step##sfx(const sagd_optim *, int, size_t, const sagd_stored *,    \
                                     float *, const sagd_stored *, const sagd_stored *,        \
                                     uint64_t);

SAGD_DECLARE_HOT(_generic)
#ifdef SAGD_HAVE_AVX2
SAGD_DECLARE_HOT(_avx2)
#endif

#endif

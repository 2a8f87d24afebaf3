/*
 * hot.c compiled a second time with AVX2 enabled (x86-64 with GCC or Clang only).
 * api.c calls these functions only when the CPU reports AVX2.
 */
#include "hot.h"

#ifdef SAGD_HAVE_AVX2
#define SAGD_HOT_SUFFIX _avx2
#define SAGD_HOT_AVX2 1
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2"))), apply_to = function)
#else
#pragma GCC target("avx2")
#endif
#include "hot.c"
#if defined(__clang__)
#pragma clang attribute pop
#endif
#else
/* Nothing to build here; ISO C wants a non-empty translation unit. */
typedef int sagd_no_avx2_build;
#endif

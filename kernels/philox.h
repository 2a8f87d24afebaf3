/* Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC11). */
#ifndef SAGD_PHILOX_H
#define SAGD_PHILOX_H

#include <stdint.h>

#define SAGD_PHILOX_M0 0xD2511F53u
#define SAGD_PHILOX_M1 0xCD9E8D57u
#define SAGD_PHILOX_W0 0x9E3779B9u
#define SAGD_PHILOX_W1 0xBB67AE85u
#define SAGD_PHILOX_ROUNDS 10

static inline void sagd_philox_block(uint32_t c[4], uint32_t k0, uint32_t k1)
{
    int r;
    for (r = 0; r < SAGD_PHILOX_ROUNDS; r++) {
        uint64_t p0 = (uint64_t)SAGD_PHILOX_M0 * c[0];
        uint64_t p1 = (uint64_t)SAGD_PHILOX_M1 * c[2];
        uint32_t y0 = (uint32_t)(p1 >> 32) ^ c[1] ^ k0;
        uint32_t y2 = (uint32_t)(p0 >> 32) ^ c[3] ^ k1;
        c[1] = (uint32_t)p1;
        c[3] = (uint32_t)p0;
        c[0] = y0;
        c[2] = y2;
        k0 += SAGD_PHILOX_W0;
        k1 += SAGD_PHILOX_W1;
    }
}

#endif

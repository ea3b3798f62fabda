// Everything an ISA translation unit includes BEFORE it switches the target ISA: standard
// headers and the plain-data argument structs. Nothing may be #included after the switch, so
// that no inline function from these headers is compiled with the wider instruction set.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__)
#include <immintrin.h>  // its intrinsics carry their own target attributes
#endif

#include "common/kernel_table.h"
#include "nb/nb_special.h"

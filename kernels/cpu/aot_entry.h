// The exported function MindSpore's AOT custom operators call (func_type="aot"): it has this
// fixed signature; the kernels take (nparam, params, ndims, shapes, dtypes) and ignore the
// CPU's stream and extra arguments.
#ifndef INSTABOOST_KERNELS_CPU_AOT_ENTRY_H_
#define INSTABOOST_KERNELS_CPU_AOT_ENTRY_H_

#include <cstdint>

#define AOT_ENTRY(NAME, FUNCTION)                                                           \
  extern "C" int NAME(int nparam, void **params, int *ndims, int64_t **shapes,             \
                      const char **dtypes, void *stream, void *extra) {                    \
    (void)stream;                                                                          \
    (void)extra;                                                                           \
    return FUNCTION(nparam, params, ndims, shapes, dtypes);                                 \
  }

#endif  // INSTABOOST_KERNELS_CPU_AOT_ENTRY_H_

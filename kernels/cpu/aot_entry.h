// The exported function MindSpore's AOT custom operators call (func_type="aot"): it has this
// fixed signature; the kernels take (nparam, params, ndims, shapes, dtypes) and ignore the
// CPU's stream and extra arguments. AOT_ENTRY_FLOAT32 is the entry of an operator whose every
// tensor is float32: it returns 1 for any other dtype, and the kernel (nparam, params, ndims,
// shapes) then reads only the shapes.
#ifndef INSTABOOST_KERNELS_CPU_AOT_ENTRY_H_
#define INSTABOOST_KERNELS_CPU_AOT_ENTRY_H_

#include <cstdint>
#include <cstring>

#define AOT_ENTRY(NAME, FUNCTION)                                                           \
  extern "C" int NAME(int nparam, void **params, int *ndims, int64_t **shapes,             \
                      const char **dtypes, void *stream, void *extra) {                    \
    (void)stream;                                                                          \
    (void)extra;                                                                           \
    return FUNCTION(nparam, params, ndims, shapes, dtypes);                                 \
  }

#define AOT_ENTRY_FLOAT32(NAME, FUNCTION)                                                   \
  extern "C" int NAME(int nparam, void **params, int *ndims, int64_t **shapes,             \
                      const char **dtypes, void *stream, void *extra) {                    \
    (void)stream;                                                                          \
    (void)extra;                                                                           \
    for (int i = 0; i < nparam; ++i) {                                                     \
      if (std::strcmp(dtypes[i], "float32") != 0) return 1;                                \
    }                                                                                      \
    return FUNCTION(nparam, params, ndims, shapes);                                        \
  }

#endif  // INSTABOOST_KERNELS_CPU_AOT_ENTRY_H_

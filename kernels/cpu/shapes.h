// Reading the tensor shapes MindSpore passes to an AOT operator (ndims[i], shapes[i]).
#ifndef INSTABOOST_KERNELS_CPU_SHAPES_H_
#define INSTABOOST_KERNELS_CPU_SHAPES_H_

#include <cstdint>

namespace tensor_shape {

// Product of shape[first .. last): a tensor's element count, or the size of some of its axes.
inline int64_t Product(const int64_t *shape, int first, int last) {
  int64_t count = 1;
  for (int d = first; d < last; ++d) count *= shape[d];
  return count;
}

// A tensor's shape as a stack of matrices: out = (batch, rows, columns); returns 2 for a 2-D
// tensor (batch 1), 3 for three or more dimensions (the trailing ones flattened: an NCHW tensor
// is (N, C, H*W), read in place, because MindSpore copies a reshaped view before a custom
// operator gets it), 0 below two dimensions.
inline int AsMatrixStack(int ndim, const int64_t *shape, int64_t out[3]) {
  if (ndim < 2) return 0;
  out[0] = ndim == 2 ? 1 : shape[0];
  out[1] = shape[ndim == 2 ? 0 : 1];
  out[2] = ndim == 2 ? shape[1] : Product(shape, 2, ndim);
  return ndim == 2 ? 2 : 3;
}

// Whether tensors i and j of an operator's parameters have the same shape.
inline bool SameShape(const int *ndims, int64_t **shapes, int i, int j) {
  if (ndims[i] != ndims[j]) return false;
  for (int d = 0; d < ndims[i]; ++d) {
    if (shapes[i][d] != shapes[j][d]) return false;
  }
  return true;
}

// Whether tensor i is 1-D with `length` values.
inline bool IsVector(const int *ndims, int64_t **shapes, int i, int64_t length) {
  return ndims[i] == 1 && shapes[i][0] == length;
}

}  // namespace tensor_shape

#endif  // INSTABOOST_KERNELS_CPU_SHAPES_H_

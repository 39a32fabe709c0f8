// fp16 instantiation of the short-sequence attention kernel (attention.cuh); one file per dtype compiles in parallel.
#include "attention.cuh"

extern "C" cudaError_t fastenc_attention_fwd_f16(const FastencAttnArgs* args, cudaStream_t stream) {
  return fastenc::attn::launch<__half>(args, stream);
}

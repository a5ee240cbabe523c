// cooperative_groups as the cluster kernels use it, on the emulator (cuda_emulation.h): found before
// the CUDA toolkit's header by the emulator build's include path.
#pragma once

#include "../cuda_emulation.h"

namespace cooperative_groups {

struct cluster_group {
  void sync() const { ::rnnkern_emu::sync_cluster(); }
  unsigned num_blocks() const { return ::rnnkern_emu::cluster_blocks(); }
  unsigned block_rank() const { return ::rnnkern_emu::cluster_rank(); }
  template <typename T>
  T* map_shared_rank(T* p, unsigned rank) const {
    return static_cast<T*>(::rnnkern_emu::map_shared_rank(p, rank));
  }
};

struct grid_group {
  void sync() const { ::rnnkern_emu::sync_grid(); }
};

inline cluster_group this_cluster() { return {}; }
inline grid_group this_grid() { return {}; }

}  // namespace cooperative_groups

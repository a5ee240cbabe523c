// Cell identifiers shared by the C++, CUDA and Python (rnnkern/_cells.py) sides.
#pragma once

namespace rnnkern {

enum class Cell : int { LSTM = 0, GRU = 1, RNN_TANH = 2, RNN_RELU = 3 };

// Gates per cell: LSTM i,f,g,o; GRU r,z,n; RNN one.
inline constexpr int cell_gates(Cell cell) {
  return cell == Cell::LSTM ? 4 : cell == Cell::GRU ? 3 : 1;
}

// Columns (in units of H) of the saved workspace per row; see docs/internals.md.
inline constexpr int cell_workspace_slots(Cell cell) {
  return cell == Cell::LSTM ? 5 : cell == Cell::GRU ? 4 : 0;
}

}  // namespace rnnkern

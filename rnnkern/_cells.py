"""Cell identifiers, shared with csrc/include/rnnkern/cells.h."""

LSTM = 0
GRU = 1
RNN_TANH = 2
RNN_RELU = 3

NAMES = {LSTM: "lstm", GRU: "gru", RNN_TANH: "rnn_tanh", RNN_RELU: "rnn_relu"}
GATES = {LSTM: 4, GRU: 3, RNN_TANH: 1, RNN_RELU: 1}
# Columns (in units of hidden_size) of the workspace each layer op saves for its backward.
WORKSPACE_SLOTS = {LSTM: 5, GRU: 4, RNN_TANH: 0, RNN_RELU: 0}


def from_mode(mode: str) -> int:
    """torch.nn's RNNBase.mode ("LSTM", "GRU", "RNN_TANH", "RNN_RELU") to a cell id."""
    return {"LSTM": LSTM, "GRU": GRU, "RNN_TANH": RNN_TANH, "RNN_RELU": RNN_RELU}[mode]

"""Names that travel inside Flower Messages, shared by the ServerApp and the ClientApp.

One module, imported by both sides, so that a key renamed on one side cannot silently
miss on the other.
"""

# RecordDict entries
ARRAYS = "arrays"  # ArrayRecord: model tensors (down: global state, up: the client's update)
CONFIG = "config"  # ConfigRecord: instructions for this node and round
METRICS = "metrics"  # MetricRecord: numbers the client reports back
PROFILE = "profile"  # ConfigRecord: the node's device profile (reply to a query)
# a profile entry: whether the node keeps the global weights between rounds, so that a
# delta downlink can serve it (client_app/sync.py); False in simulation, where 1,000 copies
# would not fit in the SuperLink's memory
KEEPS_GLOBAL = "keeps-global"

# ConfigRecord keys of a train instruction
SERVER_ROUND = "server-round"
METHOD = "method"  # the device-side method that serves the instruction (client_app/methods/): lora | hetlora | fedspine | reefl | ...
LORA_RANK = "lora-rank"
LORA_ALPHA = "lora-alpha"
SYNC_MODE = "sync-mode"  # how the global model travels down, see strategies/flora.py
FROM_VERSION = "from-version"  # the global version the node must hold to apply a delta
TO_VERSION = "to-version"  # the global version the node holds after applying the downlink

SYNC_DENSE = "dense"  # the full adapted weights; the node needs nothing
SYNC_STACKED = "stacked"  # last round's stacked adapter; the node holds from-version
SYNC_CURRENT = "current"  # nothing but the head; the node already holds to-version

# MetricRecord keys of a train reply
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"

# ArrayRecord key suffixes of a LoRA update: "<module>.lora_A" is (r, in), "<module>.lora_B" (out, r)
LORA_A = ".lora_A"
LORA_B = ".lora_B"
HEAD_PREFIX = "head."  # trainable, fully shared parameters (classification head)
INIT_PREFIX = "init."  # downlink: "init.<module>.lora_A/B", the adapter a node starts from (strategies/adapter.py)

# ConfigRecord keys of a HetLoRA train instruction (strategies/hetlora.py)
TAIL_PENALTY = "hetlora-tail-penalty"  # weight of the tail-norm regulariser
TAIL_FRACTION = "hetlora-tail-fraction"  # share of the rank components that form the tail
PRUNE_THRESHOLD = "hetlora-prune-threshold"  # drop the tail if its norm is below this share of the adapter's

# ConfigRecord keys of an early-exit train instruction (strategies/early_exit.py)
MAX_EXIT = "max-exit"  # the deepest exit (1-based) the node holds and trains; also a node-config key
EXIT_KIND = "exit-kind"  # "ree" (one shared module and head) | "per-exit" (a head per exit)
DISTILL_WEIGHT = "distill-weight"  # this round's distillation weight (ramped up by the server)
EXIT_LOSSES = "exit-losses"  # reply metric: mean training loss of each exit the node trained
TEACHER_EXIT = "teacher-exit"  # reply metric: the exit ReeFL's self-distillation used as teacher (1-based)

# FedSpine-style pruning (strategies/fedspine.py, ml/pruning.py)
PRUNE_RATIO = "prune-ratio"  # instruction: share of heads and MLP channels to prune
KEPT_PREFIX = "kept."  # reply arrays "kept.<module>.rows" / ".cols": unpruned indices the node kept
KEPT_ROWS = ".rows"
KEPT_COLS = ".cols"
LOSS_START = "loss-start"  # reply metric: mean loss of the first quarter of local steps
LOSS_END = "loss-end"  # reply metric: ... of the last quarter
LOSS_REFERENCE = "loss-reference"  # reply metric: the model as received, unpruned, on the first batch (eval mode)
LOSS_AFTER = "loss-after"  # reply metric: the trained, pruned model on the same batches: the bandit's reward compares the two

# Differential privacy (ml/privacy.py, client_app/privacy.py)
DP_EPSILON = "dp-epsilon"  # reply metric: the node's epsilon spent since the start of the run
DP_DELTA = "dp-delta"
DP_NOISE = "dp-noise-multiplier"  # reply metric: this round's DP-SGD noise multiplier
DP_SAMPLE_RATE = "dp-sample-rate"  # reply metric: this round's Poisson sampling rate
DP_STEPS = "dp-steps"  # reply metric: DP-SGD steps since the start of the run
DP_STOPPED = "dp-stopped"  # reply metric, 1: the budget is spent; the reply carries no update
LEDGER_RUN = "ledger-run"  # instruction: the run whose privacy ledgers a node continues (a resumed run's first run id)
DP_STATUS = "stamen.dp"  # reply ConfigRecord with "reason" when the node stopped training

# node-config keys (set with `flower-supernode --node-config`)
NODE_PARTITION_ID = "partition-id"
NODE_NUM_PARTITIONS = "num-partitions"
NODE_DEVICE_CLASS = "device-class"
NODE_LORA_RANK = "lora-rank"
NODE_MAX_EXIT = MAX_EXIT
NODE_NUM_THREADS = "num-threads"
NODE_DEVICE = "device"  # "auto" (CUDA if present), "cpu", "cuda", "cuda:1"
NODE_STATE_DIR = "state-dir"  # what must outlive a SuperNode restart (the DP ledger); default $FLWR_HOME/stamen-state

# node state (context.state) entries
STATE_GLOBAL = "stamen.global-weights"
STATE_META = "stamen.global-meta"
STATE_EXIT_LOSS_EMA = "stamen.exit-loss-ema"
STATE_PRUNE_SCORES = "stamen.prune-scores"  # pruning: each unit group's importance on this node
STATE_DP_LEDGER = "stamen.dp-ledger"  # DP: the node's accountant history (noise, rate, steps) rows
NODE_NETWORK = "network"  # a label for the node's link ("ethernet", "wifi", "5g"); reports group by it
NODE_LINK_DOWN_MBIT = "link-down-mbit"  # the link's rate where known (the testbed sets it): reports show goodput against it
NODE_LINK_UP_MBIT = "link-up-mbit"
NODE_EMULATE_DEVICE = "emulate-device"  # compute emulation: train at the latency model's pace of this device (client_app/pace.py)
NODE_LATENCY_MODEL = "latency-model"  # ... from this model file (a `stamen calibrate` file on the node)
NODE_TESTBED_DEVICE = "testbed-device"  # the testbed's device profile a node stands for (deploy/profiles.toml)

# Measurements (measurements/): device-side events travel to the server in a reply's
# ConfigRecord under this key when the telemetry collector did not take them.
TELEMETRY = "stamen.telemetry"
TELEMETRY_EVENTS = "events"  # its one entry: a JSON list of events
TELEMETRY_AUTH = "stamen.telemetry-auth"  # every server -> node message: that node's telemetry key (measurements/auth.py)
TELEMETRY_KEY = "key"  # its one entry, hex
FLUSH = "stamen.flush"  # a query's ConfigRecord: "send what you still hold", at the end of a run

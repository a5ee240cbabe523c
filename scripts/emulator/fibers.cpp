// The emulator's runtime (cuda_emulation.h): emulated GPU threads as fibers on one OS thread, the
// barriers and warp collectives where they switch, mbarriers and st.async, and launches.
#include "fibers.h"

#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <random>
#include <string>
#include <vector>

namespace rnnkern_emu {

// ---------------------------------------------------------------------------------------------------
// Context switches (x86-64 System V): the callee-saved registers, MXCSR and the x87 control word on
// the old stack, then the new stack's.
extern "C" void rnnkern_emu_switch(void** save_sp, void* load_sp);
asm(R"(
.text
.globl rnnkern_emu_switch
.type rnnkern_emu_switch,@function
rnnkern_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size rnnkern_emu_switch, .-rnnkern_emu_switch
.section .note.GNU-stack,"",@progbits
.text
)");

namespace {

constexpr size_t kStackBytes = 256 * 1024;  // per emulated thread (reserved; touched pages only)
constexpr uint64_t kCanary = 0x5a17c0de5a17c0deull;

struct Thread;

// A barrier over a set of threads: complete when every live member has arrived.
struct Barrier {
  int members = 0;  // live threads that take part
  int arrived = 0;
  std::vector<Thread*> waiting;
};

struct Warp {
  Barrier barrier;
  unsigned char slots[2][32][kWarpSlot];
  const char* what[2][32];
};

struct Block {
  int cluster = 0, rank = 0;
  unsigned char* smem = nullptr;
  size_t smem_bytes = 0;
  Barrier barrier;
  std::vector<Warp> warps;
  int live = 0;
};

enum class Wait { None, Barrier, Spin };

struct Thread {
  void* sp = nullptr;
  unsigned char* stack = nullptr;
  uint3 tid{}, bid{};
  int block = 0, lane = 0, warp = 0;
  bool done = false;
  uint64_t collectives = 0;  // warp collectives so far (their slot parity)
  Wait wait = Wait::None;
  const char* where = "";     // what it waits in
};

struct MBarrier {
  unsigned count = 0;
  int pending = 0;
  int64_t tx = 0;
  uint32_t phase = 0;  // parity of the phase in progress
};

struct PendingStore {
  unsigned char* dst;
  std::vector<unsigned char> data;
  uint64_t* bar;
  int target_block;
};

struct Launch {
  LaunchSpec spec;
  const std::function<void()>* body = nullptr;
  std::vector<Block> blocks;
  std::vector<Thread> threads;
  std::vector<Barrier> clusters;
  Barrier grid;
  std::map<const void*, MBarrier> mbarriers;
  std::vector<PendingStore> pending;
  std::mt19937_64 rng;
  uint64_t progress = 0;
  void* scheduler_sp = nullptr;
  Thread* current = nullptr;
  unsigned char* stacks = nullptr;
  size_t stacks_bytes = 0;
  std::vector<Guarded> smem;
};

Launch* g_launch = nullptr;

Launch& launch_state() {
  if (g_launch == nullptr || g_launch->current == nullptr) {
    std::fprintf(stderr, "emulator: a device function called outside a launch\n");
    std::_Exit(5);
  }
  return *g_launch;
}

Thread& me() { return *launch_state().current; }

std::string describe(const Thread& t) {
  char buf[96];
  std::snprintf(buf, sizeof(buf), "block %d (cluster %d, rank %d) thread %u", t.block,
                g_launch->blocks[t.block].cluster, g_launch->blocks[t.block].rank, t.tid.x);
  return buf;
}

// Back to the scheduler until resumed.
void park() {
  Launch& l = *g_launch;
  Thread* t = l.current;
  rnnkern_emu_switch(&t->sp, l.scheduler_sp);
}

void release(Barrier& b) {
  b.arrived = 0;
  for (Thread* t : b.waiting) t->wait = Wait::None;
  b.waiting.clear();
  ++g_launch->progress;
}

// Arrives at `b` and waits for its other members. The last to arrive releases them and yields once
// too, so that it does not run ahead of the threads it released (the next pass draws their order).
void arrive_and_wait(Barrier& b, const char* where) {
  Thread& t = me();
  ++g_launch->progress;
  if (++b.arrived == b.members) {
    release(b);
    t.wait = Wait::None;
  } else {
    t.wait = Wait::Barrier;
    t.where = where;
    b.waiting.push_back(&t);
  }
  park();
}

// A thread that exits leaves the barriers it belonged to (those it no longer holds up).
void leave(Barrier& b) {
  --b.members;
  if (b.arrived > 0 && b.arrived == b.members) release(b);
}

[[noreturn]] void fiber_entry() {
  Launch& l = *g_launch;
  (*l.body)();
  Thread& t = *l.current;
  t.done = true;
  ++l.progress;
  Block& blk = l.blocks[t.block];
  --blk.live;
  leave(blk.barrier);
  leave(blk.warps[t.warp].barrier);
  if (l.spec.cluster > 0) leave(l.clusters[blk.cluster]);
  leave(l.grid);
  rnnkern_emu_switch(&t.sp, l.scheduler_sp);
  std::abort();  // never resumed
}

void prepare_stack(Thread& t) {
  uint64_t* canary = reinterpret_cast<uint64_t*>(t.stack);
  for (int i = 0; i < 8; ++i) canary[i] = kCanary;
  // The return address at a 16-byte boundary (so the entry sees the stack as after a call), then the
  // registers rnnkern_emu_switch pops: 6 of them and MXCSR / the x87 control word.
  uintptr_t top = reinterpret_cast<uintptr_t>(t.stack + kStackBytes) - 64;
  top &= ~uintptr_t(15);
  uint64_t* sp = reinterpret_cast<uint64_t*>(top);
  sp[1] = 0;
  sp[0] = reinterpret_cast<uint64_t>(&fiber_entry);
  sp -= 6;
  for (int i = 0; i < 6; ++i) sp[i] = 0;
  sp -= 1;
  uint32_t mxcsr;
  uint16_t fcw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fcw));
  std::memcpy(reinterpret_cast<unsigned char*>(sp), &mxcsr, 4);
  std::memcpy(reinterpret_cast<unsigned char*>(sp) + 4, &fcw, 2);
  t.sp = sp;
}

void check_canary(const Thread& t) {
  const uint64_t* canary = reinterpret_cast<const uint64_t*>(t.stack);
  for (int i = 0; i < 8; ++i) {
    if (canary[i] != kCanary) fail("stack overflow in " + describe(t));
  }
}

void deliver(PendingStore& s) {
  Launch& l = *g_launch;
  if (l.blocks[s.target_block].live == 0) fail("st.async into a block that has exited");
  std::memcpy(s.dst, s.data.data(), s.data.size());
  auto it = l.mbarriers.find(s.bar);
  if (it == l.mbarriers.end()) fail("st.async completes on an mbarrier that was never initialised");
  MBarrier& m = it->second;
  m.tx -= static_cast<int64_t>(s.data.size());
  if (m.pending == 0 && m.tx == 0) {
    m.phase ^= 1u;
    m.pending = static_cast<int>(m.count);
  }
  ++l.progress;
}

// Delivers each pending st.async store with probability 1/2 (all of them with `all`), in random order.
void deliver_some(bool all) {
  Launch& l = *g_launch;
  std::shuffle(l.pending.begin(), l.pending.end(), l.rng);
  std::vector<PendingStore> keep;
  for (PendingStore& s : l.pending) {
    if (all || (l.rng() & 1)) {
      deliver(s);
    } else {
      keep.push_back(std::move(s));
    }
  }
  l.pending.swap(keep);
}

[[noreturn]] void report_hang() {
  Launch& l = *g_launch;
  std::map<std::string, int> where;
  for (const Thread& t : l.threads) {
    if (t.done) continue;
    char buf[160];
    std::snprintf(buf, sizeof(buf), "block %d: %s", t.block, t.where);
    ++where[buf];
  }
  std::fprintf(stderr, "emulator: HANG: no thread can go on. Waiting threads:\n");
  for (const auto& [w, n] : where) std::fprintf(stderr, "  %4d threads of %s\n", n, w.c_str());
  std::fflush(stderr);
  std::_Exit(4);
}

size_t offset_in(const Block& b, const void* p, size_t bytes) {
  const unsigned char* c = static_cast<const unsigned char*>(p);
  if (c < b.smem || c + bytes > b.smem + b.smem_bytes) {
    fail("an address outside the block's shared memory where shared memory is required");
  }
  return static_cast<size_t>(c - b.smem);
}

MBarrier& mbarrier_at(const void* bar) {
  auto it = g_launch->mbarriers.find(bar);
  if (it == g_launch->mbarriers.end()) fail("an mbarrier used before mbarrier.init");
  return it->second;
}

void segv_handler(int, siginfo_t* info, void*) {
  char buf[256];
  const Thread* t = g_launch ? g_launch->current : nullptr;
  const int n = std::snprintf(buf, sizeof(buf), "emulator: invalid access at %p by %s (a guard page: out of bounds)\n",
                              info->si_addr,
                              t ? ("block " + std::to_string(t->block) + " thread " + std::to_string(t->tid.x)).c_str()
                                : "the host");
  if (n > 0) (void)!write(2, buf, static_cast<size_t>(n));
  _exit(3);
}

}  // namespace

[[noreturn]] void fail(const std::string& why) {
  const Thread* t = g_launch ? g_launch->current : nullptr;
  std::fprintf(stderr, "emulator: ERROR: %s%s%s\n", why.c_str(), t ? " — in " : "", t ? describe(*t).c_str() : "");
  std::fflush(stderr);
  std::_Exit(6);
}

void trap(const char* why) { fail(why); }

Guarded guarded_alloc(size_t bytes) {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const size_t rounded = (bytes + 15) / 16 * 16;
  const size_t inner = (rounded + page - 1) / page * page;
  unsigned char* base = static_cast<unsigned char*>(
      mmap(nullptr, inner + 2 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  if (base == MAP_FAILED) fail("mmap failed");
  mprotect(base, page, PROT_NONE);
  mprotect(base + page + inner, page, PROT_NONE);
  Guarded g;
  g.base = base;
  g.mapped = inner + 2 * page;
  g.ptr = base + page + inner - rounded;  // the end against the upper guard page
  std::memset(g.ptr, 0xff, rounded);       // NaN in every float type until written
  return g;
}

void guarded_free(Guarded& g) {
  if (g.base != nullptr) munmap(g.base, g.mapped);
  g = Guarded{};
}

void install_fault_handler() {
  static bool done = false;
  if (done) return;
  done = true;
  static std::vector<unsigned char> alt(1 << 16);
  stack_t ss{};
  ss.ss_sp = alt.data();
  ss.ss_size = alt.size();
  sigaltstack(&ss, nullptr);
  struct sigaction sa{};
  sa.sa_sigaction = segv_handler;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigaction(SIGSEGV, &sa, nullptr);
  sigaction(SIGBUS, &sa, nullptr);
}

void run_launch(const LaunchSpec& spec, const std::function<void()>& body) {
  install_fault_handler();
  if (spec.threads % 32 != 0) fail("block size not a whole number of warps");
  if (spec.cluster > 0 && spec.blocks % spec.cluster != 0) fail("grid not a whole number of clusters");
  Launch l;
  l.spec = spec;
  l.body = &body;
  l.rng.seed(spec.seed);
  const int per_cluster = spec.cluster > 0 ? spec.cluster : static_cast<int>(spec.blocks);
  l.blocks.resize(spec.blocks);
  l.clusters.resize(spec.blocks / per_cluster);
  l.smem.resize(spec.blocks);
  for (unsigned b = 0; b < spec.blocks; ++b) {
    Block& blk = l.blocks[b];
    blk.cluster = static_cast<int>(b) / per_cluster;
    blk.rank = static_cast<int>(b) % per_cluster;
    l.smem[b] = guarded_alloc(std::max<size_t>(spec.smem, 16));
    blk.smem = l.smem[b].ptr;
    blk.smem_bytes = spec.smem;
    blk.barrier.members = static_cast<int>(spec.threads);
    blk.warps.resize(spec.threads / 32);
    for (Warp& w : blk.warps) w.barrier.members = 32;
    blk.live = static_cast<int>(spec.threads);
    l.clusters[blk.cluster].members += static_cast<int>(spec.threads);
  }
  l.grid.members = static_cast<int>(spec.blocks * spec.threads);
  const size_t count = static_cast<size_t>(spec.blocks) * spec.threads;
  l.stacks_bytes = count * kStackBytes;
  l.stacks = static_cast<unsigned char*>(mmap(nullptr, l.stacks_bytes, PROT_READ | PROT_WRITE,
                                              MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
  if (l.stacks == MAP_FAILED) fail("mmap of the fibers' stacks failed");
  l.threads.resize(count);
  for (size_t i = 0; i < count; ++i) {
    Thread& t = l.threads[i];
    t.block = static_cast<int>(i / spec.threads);
    t.tid = uint3{static_cast<unsigned>(i % spec.threads), 0, 0};
    t.bid = uint3{static_cast<unsigned>(t.block), 0, 0};
    t.lane = static_cast<int>(t.tid.x % 32);
    t.warp = static_cast<int>(t.tid.x / 32);
    t.stack = l.stacks + i * kStackBytes;
    prepare_stack(t);
  }
  g_launch = &l;
  blockDim = dim3(spec.threads);
  gridDim = dim3(spec.blocks);
  std::vector<Thread*> order;
  order.reserve(count);
  // Every other pass (drawn) some blocks sit it out (each with probability 1/4) and some threads of
  // the others (1/8), so that blocks and threads drift apart between their waits as they do on a GPU:
  // one may then run ahead of another where nothing makes it wait (a reader of memory that another
  // block writes finds it not yet written; a thread rewrites what another of its block still reads).
  std::vector<char> sits_out(l.blocks.size(), 0);
  size_t remaining = count;
  while (remaining > 0) {
    order.clear();
    for (Thread& t : l.threads) {
      if (!t.done && t.wait != Wait::Barrier) order.push_back(&t);
    }
    std::shuffle(order.begin(), order.end(), l.rng);
    const bool drift = l.rng() & 1;
    for (char& out : sits_out) out = drift && (l.rng() & 3) == 0;
    if (!l.pending.empty()) deliver_some(false);
    const uint64_t before = l.progress;
    for (Thread* t : order) {
      if (t->done || t->wait == Wait::Barrier) continue;
      if (drift && (sits_out[static_cast<size_t>(t->block)] || (l.rng() & 7) == 0)) continue;
      t->wait = Wait::None;
      l.current = t;
      threadIdx = t->tid;
      blockIdx = t->bid;
      rnnkern_emu_switch(&l.scheduler_sp, t->sp);
      l.current = nullptr;
      check_canary(*t);
      if (t->done) --remaining;
    }
    if (remaining > 0 && l.progress == before && !drift) {
      if (!l.pending.empty()) {
        deliver_some(true);
      } else {
        report_hang();
      }
    }
  }
  if (!l.pending.empty()) fail("st.async stores still undelivered when the kernel ended");
  munmap(l.stacks, l.stacks_bytes);
  for (Guarded& g : l.smem) guarded_free(g);
  g_launch = nullptr;
}

// ---------------------------------------------------------------------------------------------------
// What cuda_emulation.h declares.

int lane() { return me().lane; }

void sync_block() {
  Launch& l = launch_state();
  arrive_and_wait(l.blocks[me().block].barrier, "__syncthreads");
}

void sync_cluster() {
  Launch& l = launch_state();
  if (l.spec.cluster == 0) fail("cluster.sync() in a launch without clusters");
  arrive_and_wait(l.clusters[l.blocks[me().block].cluster], "cluster.sync");
}

void sync_grid() {
  Launch& l = launch_state();
  if (!l.spec.cooperative) fail("grid.sync() in a launch that is not cooperative");
  arrive_and_wait(l.grid, "grid.sync");
}

unsigned cluster_blocks() {
  Launch& l = launch_state();
  return l.spec.cluster > 0 ? static_cast<unsigned>(l.spec.cluster) : 1u;
}

unsigned cluster_rank() {
  Launch& l = launch_state();
  return static_cast<unsigned>(l.blocks[me().block].rank);
}

unsigned char* dynamic_shared() {
  Launch& l = launch_state();
  return l.blocks[me().block].smem;
}

uint32_t shared_offset(const void* p) {
  Launch& l = launch_state();
  return static_cast<uint32_t>(offset_in(l.blocks[me().block], p, 1));
}

void* map_shared_rank(const void* p, unsigned rank) {
  Launch& l = launch_state();
  const Block& own = l.blocks[me().block];
  if (l.spec.cluster == 0) fail("map_shared_rank in a launch without clusters");
  if (rank >= static_cast<unsigned>(l.spec.cluster)) fail("map_shared_rank to a rank outside the cluster");
  const size_t off = offset_in(own, p, 1);
  Block& other = l.blocks[own.cluster * l.spec.cluster + static_cast<int>(rank)];
  if (other.live == 0) fail("map_shared_rank into a block that has exited");
  return other.smem + off;
}

const unsigned char* warp_exchange(const char* what, const void* in, int bytes) {
  Launch& l = launch_state();
  Thread& t = me();
  Block& blk = l.blocks[t.block];
  Warp& w = blk.warps[t.warp];
  if (w.barrier.members != 32) fail(std::string(what) + " in a warp with exited lanes");
  const int parity = static_cast<int>(t.collectives & 1);
  std::memcpy(w.slots[parity][t.lane], in, static_cast<size_t>(bytes));
  w.what[parity][t.lane] = what;
  arrive_and_wait(w.barrier, what);
  for (int other = 0; other < 32; ++other) {
    if (std::strcmp(w.what[parity][other], what) != 0) {
      fail(std::string("the lanes of a warp disagree: ") + what + " here, " + w.what[parity][other] + " in lane " +
           std::to_string(other));
    }
  }
  ++t.collectives;
  return &w.slots[parity][0][0];
}

void mbarrier_init(uint64_t* bar, unsigned count) {
  Launch& l = launch_state();
  offset_in(l.blocks[me().block], bar, 8);
  MBarrier m;
  m.count = count;
  m.pending = static_cast<int>(count);
  l.mbarriers[bar] = m;
  ++l.progress;
}

void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  Launch& l = launch_state();
  offset_in(l.blocks[me().block], bar, 8);
  MBarrier& m = mbarrier_at(bar);
  m.tx += bytes;
  if (--m.pending < 0) fail("more arrivals on an mbarrier than its count");
  if (m.pending == 0 && m.tx == 0) {
    m.phase ^= 1u;
    m.pending = static_cast<int>(m.count);
  }
  ++l.progress;
}

void mbarrier_wait_parity(uint64_t* bar, uint32_t parity) {
  Launch& l = launch_state();
  offset_in(l.blocks[me().block], bar, 8);
  // try_wait.parity P succeeds once the phase of parity P has completed, i.e. while the phase in
  // progress has the other parity.
  while (mbarrier_at(bar).phase == (parity & 1u)) {
    Thread& t = me();
    t.wait = Wait::Spin;
    t.where = "mbarrier.try_wait";
    park();
  }
}

void note_progress() { ++launch_state().progress; }

void spin(const char* where) {
  Thread& t = me();
  t.wait = Wait::Spin;
  t.where = where;
  park();
}

void st_async(void* dst, const void* src, int bytes, unsigned rank, uint64_t* bar) {
  Launch& l = launch_state();
  const Block& own = l.blocks[me().block];
  if (bytes % 4 != 0 || reinterpret_cast<uintptr_t>(dst) % static_cast<uintptr_t>(bytes) != 0) {
    fail("st.async: misaligned");
  }
  unsigned char* remote = static_cast<unsigned char*>(map_shared_rank(dst, rank));
  offset_in(own, dst, static_cast<size_t>(bytes));
  uint64_t* remote_bar = static_cast<uint64_t*>(map_shared_rank(bar, rank));
  PendingStore s;
  s.dst = remote;
  s.data.assign(static_cast<const unsigned char*>(src), static_cast<const unsigned char*>(src) + bytes);
  s.bar = remote_bar;
  s.target_block = own.cluster * l.spec.cluster + static_cast<int>(rank);
  l.pending.push_back(std::move(s));
  ++l.progress;
}

namespace {

double element(int kind, uint32_t word, int half) {
  if (kind == kMmaTF32) {
    const uint32_t bits = word & 0xffffe000u;  // the tensor cores read TF32's 19 bits
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }
  const uint16_t bits = static_cast<uint16_t>(half ? word >> 16 : word & 0xffffu);
  if (kind == kMmaF16) {
    __half_raw r;
    r.x = bits;
    return __half2float(__half(r));
  }
  __nv_bfloat16_raw r;
  r.x = bits;
  return __bfloat162float(__nv_bfloat16(r));
}

}  // namespace

void mma_m16n8(int kind, float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  struct Fragments {
    uint32_t a[4], b[2];
    float c[4];
  } mine;
  std::memcpy(mine.a, a, sizeof(mine.a));
  std::memcpy(mine.b, b, sizeof(mine.b));
  std::memcpy(mine.c, d, sizeof(mine.c));
  static_assert(sizeof(Fragments) <= kWarpSlot);
  const unsigned char* all = warp_exchange("mma.sync", &mine, sizeof(mine));
  const int K = kind == kMmaTF32 ? 8 : 16;
  double A[16][16], B[16][8];
  for (int ln = 0; ln < 32; ++ln) {
    Fragments f;
    std::memcpy(&f, all + ln * kWarpSlot, sizeof(f));
    const int gid = ln / 4, tig = ln % 4;
    if (kind == kMmaTF32) {
      // m16n8k8 .tf32: a0 (gid, tig), a1 (gid + 8, tig), a2 (gid, tig + 4), a3 (gid + 8, tig + 4);
      // b0 (k = tig, n = gid), b1 (k = tig + 4, n = gid).
      A[gid][tig] = element(kind, f.a[0], 0);
      A[gid + 8][tig] = element(kind, f.a[1], 0);
      A[gid][tig + 4] = element(kind, f.a[2], 0);
      A[gid + 8][tig + 4] = element(kind, f.a[3], 0);
      B[tig][gid] = element(kind, f.b[0], 0);
      B[tig + 4][gid] = element(kind, f.b[1], 0);
    } else {
      // m16n8k16 .f16/.bf16: a_i (i = 0..7, two per register): row gid for i in {0,1,4,5}, else
      // gid + 8; column 2 tig + (i & 1), + 8 for i >= 4. b_i (i = 0..3): k = 2 tig + (i & 1), + 8
      // for i >= 2; n = gid.
      for (int i = 0; i < 8; ++i) {
        const int row = gid + ((i == 2 || i == 3 || i == 6 || i == 7) ? 8 : 0);
        const int col = 2 * tig + (i & 1) + (i >= 4 ? 8 : 0);
        A[row][col] = element(kind, f.a[i / 2], i & 1);
      }
      for (int i = 0; i < 4; ++i) B[2 * tig + (i & 1) + (i >= 2 ? 8 : 0)][gid] = element(kind, f.b[i / 2], i & 1);
    }
  }
  // c_i / d_i: row gid (i < 2) or gid + 8, column 2 tig + (i & 1).
  const int gid = lane() / 4, tig = lane() % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = gid + (i >= 2 ? 8 : 0), col = 2 * tig + (i & 1);
    double sum = mine.c[i];
    for (int k = 0; k < K; ++k) sum += A[row][k] * B[k][col];
    d[i] = static_cast<float>(sum);
  }
}

}  // namespace rnnkern_emu

uint3 threadIdx, blockIdx;
dim3 blockDim, gridDim;

// Paged KV block manager: fixed-size blocks with reference counts, fork (shared blocks),
// copy-on-write of a shared partially filled last block, truncate (rollback), and automatic
// prefix caching: full blocks of real tokens get a chained hash, a new sequence whose tokens
// start with cached blocks takes them, and freed cached blocks wait in an LRU list until a
// block is needed and none is free.
#pragma once

#include <cstdint>
#include <list>
#include <memory>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace selfeval {

// Raised when the pool cannot satisfy a request; the state is left unchanged.
struct OutOfBlocksError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
// Raised for an unknown or duplicate sequence id.
struct SequenceIdError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct AppendResult {
  std::vector<int64_t> slots;                 // one cache slot per appended token
  std::vector<std::pair<int32_t, int32_t>> cow;  // (src, dst) block copies to run first
};

class BlockManager {
 public:
  // hash_mask narrows the block hash (tests force collisions with a small one).
  BlockManager(int64_t num_blocks, int64_t block_size, uint64_t hash_mask = ~uint64_t{0});

  // Creates seq_id holding num_tokens slots; returns their slots.
  std::vector<int64_t> allocate(int64_t seq_id, int64_t num_tokens);
  // Creates seq_id over the longest run of cached full blocks that starts `tokens` (leaving at
  // least one token to compute) under `ns` (a namespace: sequences of different namespaces
  // never share). Returns the number of cached tokens the sequence now holds.
  int64_t allocate_prefix(int64_t seq_id, const std::vector<int64_t>& tokens, uint64_t ns);
  // Registers the sequence's next full blocks, whose tokens are `tokens` (starting at
  // num_hashed_tokens(seq_id); a trailing partial block is ignored). Returns blocks hashed.
  int64_t cache_blocks(int64_t seq_id, const std::vector<int64_t>& tokens);
  int64_t num_hashed_tokens(int64_t seq_id) const;
  // Grows seq_id by num_tokens; a shared last block is copied first (copy-on-write).
  AppendResult append(int64_t seq_id, int64_t num_tokens);
  // Grows several sequences at once, all or nothing; slots are concatenated in order.
  AppendResult append_many(const std::vector<int64_t>& seq_ids,
                           const std::vector<int64_t>& counts);
  // Child shares every block of the parent: O(blocks) integer work, no KV copied.
  void fork(int64_t parent_id, int64_t child_id);
  // Rolls seq_id back to length tokens, releasing blocks past it.
  void truncate(int64_t seq_id, int64_t length);
  void free(int64_t seq_id);

  // A transaction: after begin(), rollback() undoes every change since (blocks, reference
  // counts, free and LRU lists, cache entries, sequences); commit() keeps them. A block written
  // in place during the transaction leaves the prefix cache for good. rollback() returns the
  // blocks that were freed or evicted and handed out again inside the transaction and are held
  // again after it: their KV may be another sequence's now, so their holders must recompute.
  void begin();
  void commit();
  std::vector<int32_t> rollback();
  bool in_transaction() const { return journal_; }

  // Blocks that append(seq_id, num_tokens) would take from the pool (copy-on-write included).
  int64_t blocks_needed(int64_t seq_id, int64_t num_tokens) const;
  // The sum of blocks_needed(id, num_tokens) over seq_ids (each counted as if alone).
  int64_t blocks_needed_many(const std::vector<int64_t>& seq_ids, int64_t num_tokens) const;
  bool contains(int64_t seq_id) const { return seqs_.count(seq_id) != 0; }
  int64_t length(int64_t seq_id) const;
  const std::vector<int32_t>& block_ids(int64_t seq_id) const;
  int32_t ref_count(int64_t block) const;
  // Free blocks include evictable ones (cached, no longer referenced).
  int64_t num_free_blocks() const { return static_cast<int64_t>(free_.size() + lru_.size()); }
  int64_t num_cached_blocks() const { return static_cast<int64_t>(cached_.size()); }
  int64_t num_evictable_blocks() const { return static_cast<int64_t>(lru_.size()); }
  std::vector<int32_t> evictable_blocks() const { return {lru_.begin(), lru_.end()}; }  // LRU first
  bool is_cached(int64_t block) const;
  int64_t num_blocks() const { return num_blocks_; }
  int64_t block_size() const { return block_size_; }
  int64_t num_sequences() const { return static_cast<int64_t>(seqs_.size()); }
  std::vector<int64_t> sequence_ids() const;
  // Row-major [seq_ids.size(), width] table, padded with 0 (never read past a context length).
  void fill_block_tables(const std::vector<int64_t>& seq_ids, int64_t width, int32_t* out) const;
  int64_t max_blocks(const std::vector<int64_t>& seq_ids) const;

 private:
  struct Seq {
    std::vector<int32_t> blocks;
    int64_t length = 0;
    uint64_t ns = 0;
    // The hashed prefix: per full block its chained hash and the cached block that holds that
    // content (the sequence's own block, or an earlier identical one it did not replace).
    std::vector<uint64_t> chain;
    std::vector<int32_t> canon;
    std::vector<uint32_t> canon_epoch;
    bool chain_stopped = false;  // a hash collision with another live entry: hash no further
  };
  Seq& get(int64_t seq_id);
  const Seq& get(int64_t seq_id) const;
  int32_t take_block();
  void release_block(int32_t block);
  void append_into(int64_t seq_id, Seq& seq, int64_t num_tokens, AppendResult& out);
  void set_ref(int32_t block, int32_t value);
  void free_push(int32_t block);
  int32_t free_pop();
  void lru_push(int32_t block);
  void lru_erase(int32_t block);
  void save_meta(int32_t block);
  void map_set(uint64_t hash, int32_t block);
  void map_erase(uint64_t hash);
  void save_seq(int64_t seq_id);
  int64_t blocks_for(int64_t tokens) const { return (tokens + block_size_ - 1) / block_size_; }
  uint64_t block_hash(uint64_t parent, uint64_t ns, const int64_t* tokens) const;
  bool same_entry(int32_t block, uint64_t ns, const int64_t* tokens, int32_t parent,
                  uint32_t parent_epoch) const;
  bool stale(int32_t block) const;
  void uncache(int32_t block);

  int64_t num_blocks_;
  int64_t block_size_;
  uint64_t hash_mask_;
  std::vector<int32_t> ref_;
  std::vector<int32_t> free_;  // stack of free, uncached block ids
  std::unordered_map<int64_t, Seq> seqs_;
  // Prefix cache: hash -> block; per block its entry (valid while cached_block_[b]).
  std::unordered_map<uint64_t, int32_t> cached_;
  std::vector<char> cached_block_;
  std::vector<uint64_t> hash_, ns_;
  std::vector<uint32_t> epoch_, parent_epoch_;  // a parent is identified by (block, epoch)
  std::vector<int32_t> parent_;
  std::vector<int64_t> tokens_;  // [num_blocks * block_size] tokens of each cached block
  std::list<int32_t> lru_;  // evictable: cached with ref 0, least recently freed first
  std::vector<std::list<int32_t>::iterator> lru_pos_;

  struct Meta {
    char cached;
    uint64_t hash, ns;
    uint32_t epoch, parent_epoch;
    int32_t parent;
    std::vector<int64_t> tokens;
  };
  struct Undo {
    enum Kind { REF, FREE_PUSH, FREE_POP, LRU_PUSH, LRU_ERASE, META, MAP, SEQ_CREATE, SEQ_SAVE, SEQ_APPEND };
    Kind kind;
    int64_t a = 0, b = 0, c = 0, d = 0;  // per kind: block or sequence id, old values
    uint64_t hash = 0;
    std::unique_ptr<Seq> seq;
    std::unique_ptr<Meta> meta;
  };
  bool journal_ = false;
  std::vector<Undo> log_;
  // Per block, the first offset written in place in this transaction (kNotWritten: none), and
  // the blocks written (a vector, not a map: a decode step writes in place in every sequence).
  static constexpr int32_t kNotWritten = INT32_MAX;
  std::vector<int32_t> written_;
  std::vector<int32_t> written_blocks_;
  void clear_written();
};

}  // namespace selfeval

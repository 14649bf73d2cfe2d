// Paged KV block manager: fixed-size blocks with reference counts, fork (shared blocks),
// copy-on-write of a shared partially filled last block, and truncate (rollback).
#pragma once

#include <cstdint>
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
  BlockManager(int64_t num_blocks, int64_t block_size);

  // Creates seq_id holding num_tokens slots; returns their slots.
  std::vector<int64_t> allocate(int64_t seq_id, int64_t num_tokens);
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

  // Blocks that append(seq_id, num_tokens) would take from the pool (copy-on-write included).
  int64_t blocks_needed(int64_t seq_id, int64_t num_tokens) const;
  bool contains(int64_t seq_id) const { return seqs_.count(seq_id) != 0; }
  int64_t length(int64_t seq_id) const;
  const std::vector<int32_t>& block_ids(int64_t seq_id) const;
  int32_t ref_count(int64_t block) const;
  int64_t num_free_blocks() const { return static_cast<int64_t>(free_.size()); }
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
  };
  Seq& get(int64_t seq_id);
  const Seq& get(int64_t seq_id) const;
  int32_t take_block();
  void release_block(int32_t block);
  void append_into(Seq& seq, int64_t num_tokens, AppendResult& out);
  int64_t blocks_for(int64_t tokens) const { return (tokens + block_size_ - 1) / block_size_; }

  int64_t num_blocks_;
  int64_t block_size_;
  std::vector<int32_t> ref_;
  std::vector<int32_t> free_;  // stack of free block ids
  std::unordered_map<int64_t, Seq> seqs_;
};

}  // namespace selfeval

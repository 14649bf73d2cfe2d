#include "block_manager.h"

#include <algorithm>
#include <unordered_set>

namespace selfeval {

namespace {
std::string seq_name(int64_t seq_id) { return "sequence " + std::to_string(seq_id); }
}  // namespace

BlockManager::BlockManager(int64_t num_blocks, int64_t block_size, uint64_t hash_mask)
    : num_blocks_(num_blocks), block_size_(block_size), hash_mask_(hash_mask) {
  if (num_blocks <= 0 || num_blocks > INT32_MAX) {
    throw std::invalid_argument("num_blocks must be in [1, 2^31), got " + std::to_string(num_blocks));
  }
  if (block_size <= 0) {
    throw std::invalid_argument("block_size must be positive, got " + std::to_string(block_size));
  }
  ref_.assign(num_blocks, 0);
  written_.assign(num_blocks, kNotWritten);
  cached_block_.assign(num_blocks, 0);
  hash_.assign(num_blocks, 0);
  ns_.assign(num_blocks, 0);
  epoch_.assign(num_blocks, 0);
  parent_epoch_.assign(num_blocks, 0);
  parent_.assign(num_blocks, -1);
  tokens_.assign(num_blocks * block_size, 0);
  lru_pos_.resize(num_blocks);
  free_.reserve(num_blocks);
  // Lowest ids on top of the stack so a fresh pool hands out 0, 1, 2, ...
  for (int64_t b = num_blocks - 1; b >= 0; --b) free_.push_back(static_cast<int32_t>(b));
}

BlockManager::Seq& BlockManager::get(int64_t seq_id) {
  auto it = seqs_.find(seq_id);
  if (it == seqs_.end()) throw SequenceIdError("unknown " + seq_name(seq_id));
  return it->second;
}

const BlockManager::Seq& BlockManager::get(int64_t seq_id) const {
  auto it = seqs_.find(seq_id);
  if (it == seqs_.end()) throw SequenceIdError("unknown " + seq_name(seq_id));
  return it->second;
}

// ---- every change of state goes through these, so a transaction can undo it ----------

void BlockManager::set_ref(int32_t block, int32_t value) {
  if (journal_) log_.push_back({Undo::REF, block, ref_[block]});
  ref_[block] = value;
}

void BlockManager::free_push(int32_t block) {
  if (journal_) log_.push_back({Undo::FREE_PUSH, block});
  free_.push_back(block);
}

int32_t BlockManager::free_pop() {
  int32_t b = free_.back();
  free_.pop_back();
  if (journal_) log_.push_back({Undo::FREE_POP, b});
  return b;
}

void BlockManager::lru_push(int32_t block) {
  lru_pos_[block] = lru_.insert(lru_.end(), block);
  if (journal_) log_.push_back({Undo::LRU_PUSH, block});
}

void BlockManager::lru_erase(int32_t block) {
  auto it = lru_pos_[block];
  auto next = std::next(it);
  if (journal_) log_.push_back({Undo::LRU_ERASE, block, next == lru_.end() ? -1 : *next});
  lru_.erase(it);
}

void BlockManager::save_meta(int32_t block) {
  if (!journal_) return;
  Undo u{Undo::META, block};
  u.meta = std::make_unique<Meta>(Meta{cached_block_[block], hash_[block], ns_[block], epoch_[block],
                                       parent_epoch_[block], parent_[block],
                                       std::vector<int64_t>(tokens_.begin() + block * block_size_,
                                                            tokens_.begin() + (block + 1) * block_size_)});
  log_.push_back(std::move(u));
}

void BlockManager::map_set(uint64_t hash, int32_t block) {
  auto it = cached_.find(hash);
  if (journal_) log_.push_back({Undo::MAP, it == cached_.end() ? -1 : it->second, 0, 0, 0, hash});
  cached_[hash] = block;
}

void BlockManager::map_erase(uint64_t hash) {
  auto it = cached_.find(hash);
  if (it == cached_.end()) return;
  if (journal_) log_.push_back({Undo::MAP, it->second, 0, 0, 0, hash});
  cached_.erase(it);
}

void BlockManager::save_seq(int64_t seq_id) {
  if (!journal_) return;
  auto it = seqs_.find(seq_id);
  Undo u{it == seqs_.end() ? Undo::SEQ_CREATE : Undo::SEQ_SAVE, seq_id};
  if (it != seqs_.end()) u.seq = std::make_unique<Seq>(it->second);
  log_.push_back(std::move(u));
}

void BlockManager::begin() {
  log_.clear();
  clear_written();
  journal_ = true;
}

void BlockManager::commit() {
  log_.clear();
  clear_written();
  journal_ = false;
}

void BlockManager::clear_written() {
  for (int32_t b : written_blocks_) written_[b] = kNotWritten;
  written_blocks_.clear();
}

std::vector<int32_t> BlockManager::rollback() {
  std::vector<int32_t> taken;
  for (auto u = log_.rbegin(); u != log_.rend(); ++u) {
    if (u->kind == Undo::FREE_POP) taken.push_back(static_cast<int32_t>(u->a));
    switch (u->kind) {
      case Undo::REF: ref_[u->a] = static_cast<int32_t>(u->b); break;
      case Undo::FREE_PUSH: free_.pop_back(); break;
      case Undo::FREE_POP: free_.push_back(static_cast<int32_t>(u->a)); break;
      case Undo::LRU_PUSH: lru_.erase(lru_pos_[u->a]); break;
      case Undo::LRU_ERASE:
        lru_pos_[u->a] = lru_.insert(u->b < 0 ? lru_.end() : lru_pos_[u->b], static_cast<int32_t>(u->a));
        break;
      case Undo::META: {
        const Meta& m = *u->meta;
        cached_block_[u->a] = m.cached;
        hash_[u->a] = m.hash;
        ns_[u->a] = m.ns;
        epoch_[u->a] = m.epoch;
        parent_epoch_[u->a] = m.parent_epoch;
        parent_[u->a] = m.parent;
        std::copy(m.tokens.begin(), m.tokens.end(), tokens_.begin() + u->a * block_size_);
        break;
      }
      case Undo::MAP:
        if (u->a < 0) cached_.erase(u->hash); else cached_[u->hash] = static_cast<int32_t>(u->a);
        break;
      case Undo::SEQ_CREATE: seqs_.erase(u->a); break;
      case Undo::SEQ_SAVE: seqs_[u->a] = *u->seq; break;
      case Undo::SEQ_APPEND: {
        Seq& s = seqs_.at(u->a);
        s.blocks.resize(static_cast<size_t>(u->c));
        if (u->c > 0) s.blocks.back() = static_cast<int32_t>(u->d);
        s.length = u->b;
        break;
      }
    }
  }
  log_.clear();
  journal_ = false;  // what follows is not undone
  // A block handed out during the transaction that is held or cached again now was freed or
  // evicted and reused inside it: its KV may have been overwritten. It leaves the cache, and
  // the caller recomputes the sequences that hold it.
  std::vector<int32_t> clobbered;
  std::sort(taken.begin(), taken.end());
  taken.erase(std::unique(taken.begin(), taken.end()), taken.end());
  for (int32_t b : taken) {
    if (ref_[b] > 0 || cached_block_[b]) {
      uncache(b);
      clobbered.push_back(b);
    }
  }
  // Blocks written in place whose holders, restored, count written positions as valid.
  for (const auto& kv : seqs_) {
    const Seq& s = kv.second;
    for (size_t i = 0; i < s.blocks.size(); ++i) {
      int32_t offset = written_[s.blocks[i]];
      if (offset != kNotWritten && s.length > static_cast<int64_t>(i) * block_size_ + offset) {
        uncache(s.blocks[i]);
        clobbered.push_back(s.blocks[i]);
      }
    }
  }
  clear_written();
  std::sort(clobbered.begin(), clobbered.end());
  clobbered.erase(std::unique(clobbered.begin(), clobbered.end()), clobbered.end());
  return clobbered;
}

int32_t BlockManager::take_block() {
  if (free_.empty()) uncache(lru_.front());  // evict the least recently freed cached block
  int32_t b = free_pop();
  set_ref(b, 1);
  return b;
}

void BlockManager::release_block(int32_t block) {
  set_ref(block, ref_[block] - 1);
  if (ref_[block] != 0) return;
  if (cached_block_[block]) {
    lru_push(block);
  } else {
    free_push(block);
  }
}

// ---- prefix cache -----------------------------------------------------------------------

namespace {
uint64_t mix(uint64_t x) {  // splitmix64's finalizer
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}
}  // namespace

uint64_t BlockManager::block_hash(uint64_t parent, uint64_t ns, const int64_t* tokens) const {
  uint64_t h = mix(parent ^ mix(ns));
  for (int64_t i = 0; i < block_size_; ++i) h = mix(h ^ static_cast<uint64_t>(tokens[i]));
  return h & hash_mask_;
}

bool BlockManager::is_cached(int64_t block) const {
  if (block < 0 || block >= num_blocks_) {
    throw std::out_of_range("block " + std::to_string(block) + " out of range");
  }
  return cached_block_[block] != 0;
}

// Whether cached `block` holds exactly these tokens after exactly this parent entry (block,
// epoch): the hash only finds a candidate, the tokens and the parent's identity decide.
bool BlockManager::same_entry(int32_t block, uint64_t ns, const int64_t* tokens, int32_t parent,
                              uint32_t parent_epoch) const {
  if (!cached_block_[block] || ns_[block] != ns || parent_[block] != parent) return false;
  if (parent >= 0 && parent_epoch_[block] != parent_epoch) return false;
  return std::equal(tokens, tokens + block_size_, tokens_.begin() + block * block_size_);
}

// An entry whose parent entry is gone can never be found again: it may be replaced.
bool BlockManager::stale(int32_t block) const {
  int32_t p = parent_[block];
  return p >= 0 && (!cached_block_[p] || parent_epoch_[block] != epoch_[p]);
}

void BlockManager::uncache(int32_t block) {
  if (!cached_block_[block]) return;
  save_meta(block);
  auto it = cached_.find(hash_[block]);
  if (it != cached_.end() && it->second == block) map_erase(hash_[block]);
  cached_block_[block] = 0;
  if (ref_[block] == 0) {
    lru_erase(block);
    free_push(block);
  }
}

int64_t BlockManager::allocate_prefix(int64_t seq_id, const std::vector<int64_t>& tokens, uint64_t ns) {
  if (seqs_.count(seq_id)) throw SequenceIdError(seq_name(seq_id) + " already exists");
  Seq s;
  s.ns = ns;
  int64_t max_blocks = tokens.empty() ? 0 : (static_cast<int64_t>(tokens.size()) - 1) / block_size_;
  uint64_t h = 0;
  for (int64_t i = 0; i < max_blocks; ++i) {
    const int64_t* t = tokens.data() + i * block_size_;
    h = block_hash(h, ns, t);
    auto it = cached_.find(h);
    int32_t parent = i ? s.canon.back() : -1;
    if (it == cached_.end() || !same_entry(it->second, ns, t, parent, i ? s.canon_epoch.back() : 0)) break;
    int32_t b = it->second;
    if (ref_[b] == 0) lru_erase(b);
    set_ref(b, ref_[b] + 1);
    s.blocks.push_back(b);
    s.chain.push_back(h);
    s.canon.push_back(b);
    s.canon_epoch.push_back(epoch_[b]);
  }
  s.length = static_cast<int64_t>(s.blocks.size()) * block_size_;
  int64_t cached = s.length;
  save_seq(seq_id);
  seqs_.emplace(seq_id, std::move(s));
  return cached;
}

int64_t BlockManager::num_hashed_tokens(int64_t seq_id) const {
  return static_cast<int64_t>(get(seq_id).canon.size()) * block_size_;
}

int64_t BlockManager::cache_blocks(int64_t seq_id, const std::vector<int64_t>& tokens) {
  Seq& s = get(seq_id);
  save_seq(seq_id);
  int64_t first = static_cast<int64_t>(s.canon.size());
  int64_t count = static_cast<int64_t>(tokens.size()) / block_size_;
  if (first + count > s.length / block_size_) {
    throw std::invalid_argument("cache_blocks: " + seq_name(seq_id) + " holds " +
                                std::to_string(s.length / block_size_) + " full blocks, not " +
                                std::to_string(first + count));
  }
  int64_t added = 0;
  for (int64_t j = 0; j < count && !s.chain_stopped; ++j) {
    int64_t i = first + j;
    const int64_t* t = tokens.data() + j * block_size_;
    int32_t parent = i ? s.canon.back() : -1;
    uint32_t parent_epoch = i ? s.canon_epoch.back() : 0;
    if (parent >= 0 && (!cached_block_[parent] || epoch_[parent] != parent_epoch)) {
      s.chain_stopped = true;  // the parent entry is gone: nothing could find this one
      break;
    }
    uint64_t h = block_hash(i ? s.chain.back() : 0, s.ns, t);
    int32_t b = s.blocks[i];
    int32_t entry = b;
    if (cached_block_[b]) {
      if (hash_[b] != h || !same_entry(b, s.ns, t, parent, parent_epoch)) {
        s.chain_stopped = true;
        break;
      }
    } else {
      auto it = cached_.find(h);
      if (it != cached_.end() && same_entry(it->second, s.ns, t, parent, parent_epoch)) {
        entry = it->second;  // the same content is cached already, in another block
      } else {
        if (it != cached_.end()) {
          if (!stale(it->second)) {  // a real collision: keep the live entry, hash no further
            s.chain_stopped = true;
            break;
          }
          uncache(it->second);
        }
        save_meta(b);
        cached_block_[b] = 1;
        hash_[b] = h;
        ns_[b] = s.ns;
        parent_[b] = parent;
        parent_epoch_[b] = parent_epoch;
        ++epoch_[b];
        std::copy(t, t + block_size_, tokens_.begin() + b * block_size_);
        map_set(h, b);
        ++added;
      }
    }
    s.chain.push_back(h);
    s.canon.push_back(entry);
    s.canon_epoch.push_back(epoch_[entry]);
  }
  return added;
}

int64_t BlockManager::blocks_needed(int64_t seq_id, int64_t num_tokens) const {
  const Seq& s = get(seq_id);
  if (num_tokens <= 0) return 0;
  int64_t need = blocks_for(s.length + num_tokens) - static_cast<int64_t>(s.blocks.size());
  if (s.length % block_size_ != 0 && ref_[s.blocks.back()] > 1) need += 1;
  return need;
}

int64_t BlockManager::blocks_needed_many(const std::vector<int64_t>& seq_ids, int64_t num_tokens) const {
  int64_t need = 0;
  for (int64_t id : seq_ids) need += blocks_needed(id, num_tokens);
  return need;
}

void BlockManager::append_into(int64_t seq_id, Seq& s, int64_t num_tokens, AppendResult& out) {
  if (num_tokens <= 0) return;
  if (journal_) {
    log_.push_back({Undo::SEQ_APPEND, seq_id, s.length, static_cast<int64_t>(s.blocks.size()),
                    s.blocks.empty() ? -1 : s.blocks.back()});
  }
  // Only a partially filled last block can be shared with a sibling; copy it before writing.
  if (s.length % block_size_ != 0) {
    int32_t& last = s.blocks.back();
    if (ref_[last] > 1) {
      int32_t fresh = take_block();
      out.cow.emplace_back(last, fresh);
      release_block(last);
      last = fresh;
    } else if (cached_block_[last]) {
      // A cached block (rolled back into) is about to change: it leaves the cache for good,
      // even if this transaction is undone (the forward may have written into it).
      bool journal = journal_;
      journal_ = false;
      uncache(last);
      journal_ = journal;
    }
  }
  int64_t new_length = s.length + num_tokens;
  while (static_cast<int64_t>(s.blocks.size()) < blocks_for(new_length)) {
    s.blocks.push_back(take_block());
  }
  if (journal_ && s.length % block_size_ != 0) {
    // Written in place: if this transaction is undone, positions from here on may be valid again
    // (a truncate earlier in it), and their KV is now this append's.
    int32_t last = s.blocks[s.length / block_size_];
    int32_t offset = static_cast<int32_t>(s.length % block_size_);
    int32_t& first = written_[last];
    if (first == kNotWritten) written_blocks_.push_back(last);
    if (first > offset) first = offset;
  }
  out.slots.reserve(out.slots.size() + num_tokens);
  for (int64_t p = s.length; p < new_length; ++p) {
    out.slots.push_back(static_cast<int64_t>(s.blocks[p / block_size_]) * block_size_ +
                        p % block_size_);
  }
  s.length = new_length;
}

std::vector<int64_t> BlockManager::allocate(int64_t seq_id, int64_t num_tokens) {
  if (seqs_.count(seq_id)) throw SequenceIdError(seq_name(seq_id) + " already exists");
  if (num_tokens < 0) throw std::invalid_argument("num_tokens must be >= 0");
  int64_t need = blocks_for(num_tokens);
  if (need > num_free_blocks()) {
    throw OutOfBlocksError("out of KV blocks: " + seq_name(seq_id) + " needs " +
                           std::to_string(need) + ", " + std::to_string(num_free_blocks()) +
                           " free");
  }
  save_seq(seq_id);
  Seq& s = seqs_[seq_id];
  AppendResult out;
  append_into(seq_id, s, num_tokens, out);
  return std::move(out.slots);
}

AppendResult BlockManager::append(int64_t seq_id, int64_t num_tokens) {
  return append_many({seq_id}, {num_tokens});
}

AppendResult BlockManager::append_many(const std::vector<int64_t>& seq_ids,
                                       const std::vector<int64_t>& counts) {
  if (seq_ids.size() != counts.size()) {
    throw std::invalid_argument("seq_ids and counts differ in length");
  }
  // Validate and count exactly what the whole batch takes before touching any state;
  // siblings sharing a last block copy it once each until the last holder writes in place.
  std::unordered_map<int32_t, int32_t> released;
  std::unordered_set<int64_t> seen;
  int64_t need = 0;
  for (size_t i = 0; i < seq_ids.size(); ++i) {
    if (counts[i] < 0) throw std::invalid_argument("num_tokens must be >= 0");
    if (!seen.insert(seq_ids[i]).second) {
      throw SequenceIdError(seq_name(seq_ids[i]) + " appears twice in one append");
    }
    const Seq& s = get(seq_ids[i]);
    if (counts[i] == 0) continue;
    need += blocks_for(s.length + counts[i]) - static_cast<int64_t>(s.blocks.size());
    if (s.length % block_size_ != 0 && ref_[s.blocks.back()] > 1) {
      int32_t last = s.blocks.back();
      if (ref_[last] - released[last] > 1) {
        need += 1;
        released[last] += 1;
      }
    }
  }
  if (need > num_free_blocks()) {
    throw OutOfBlocksError("out of KV blocks: append needs " + std::to_string(need) + ", " +
                           std::to_string(num_free_blocks()) + " free");
  }
  AppendResult out;
  for (size_t i = 0; i < seq_ids.size(); ++i) append_into(seq_ids[i], seqs_[seq_ids[i]], counts[i], out);
  return out;
}

void BlockManager::fork(int64_t parent_id, int64_t child_id) {
  const Seq& parent = get(parent_id);
  if (seqs_.count(child_id)) throw SequenceIdError(seq_name(child_id) + " already exists");
  Seq child = parent;  // copies the block ids only
  for (int32_t b : child.blocks) set_ref(b, ref_[b] + 1);
  save_seq(child_id);
  seqs_.emplace(child_id, std::move(child));
}

void BlockManager::truncate(int64_t seq_id, int64_t length) {
  Seq& s = get(seq_id);
  if (length < 0 || length > s.length) {
    throw std::invalid_argument("cannot truncate " + seq_name(seq_id) + " of length " +
                            std::to_string(s.length) + " to " + std::to_string(length));
  }
  save_seq(seq_id);
  int64_t keep = blocks_for(length);
  while (static_cast<int64_t>(s.blocks.size()) > keep) {
    release_block(s.blocks.back());
    s.blocks.pop_back();
  }
  s.length = length;
  size_t full = static_cast<size_t>(length / block_size_);
  if (s.canon.size() > full) {
    s.canon.resize(full);
    s.canon_epoch.resize(full);
    s.chain.resize(full);
    s.chain_stopped = false;
  }
}

void BlockManager::free(int64_t seq_id) {
  Seq& s = get(seq_id);
  save_seq(seq_id);
  for (int32_t b : s.blocks) release_block(b);
  seqs_.erase(seq_id);
}

int64_t BlockManager::length(int64_t seq_id) const { return get(seq_id).length; }

const std::vector<int32_t>& BlockManager::block_ids(int64_t seq_id) const {
  return get(seq_id).blocks;
}

int32_t BlockManager::ref_count(int64_t block) const {
  if (block < 0 || block >= num_blocks_) {
    throw std::out_of_range("block " + std::to_string(block) + " out of range");
  }
  return ref_[block];
}

std::vector<int64_t> BlockManager::sequence_ids() const {
  std::vector<int64_t> ids;
  ids.reserve(seqs_.size());
  for (const auto& kv : seqs_) ids.push_back(kv.first);
  std::sort(ids.begin(), ids.end());
  return ids;
}

int64_t BlockManager::max_blocks(const std::vector<int64_t>& seq_ids) const {
  int64_t m = 0;
  for (int64_t id : seq_ids) m = std::max<int64_t>(m, get(id).blocks.size());
  return m;
}

void BlockManager::fill_block_tables(const std::vector<int64_t>& seq_ids, int64_t width,
                                     int32_t* out) const {
  for (size_t i = 0; i < seq_ids.size(); ++i) {
    const auto& blocks = get(seq_ids[i]).blocks;
    if (static_cast<int64_t>(blocks.size()) > width) {
      throw std::invalid_argument("block table width " + std::to_string(width) + " < " +
                                  std::to_string(blocks.size()) + " blocks of " +
                                  seq_name(seq_ids[i]));
    }
    int32_t* row = out + i * width;
    std::copy(blocks.begin(), blocks.end(), row);
    std::fill(row + blocks.size(), row + width, 0);
  }
}

}  // namespace selfeval

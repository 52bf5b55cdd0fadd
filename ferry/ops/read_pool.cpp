// A pool of reader threads that never take Python's GIL: reads of whole byte ranges of a file into memory the
// caller owns (an expert cache slot), demand reads before prefetches. Python submits a read and gets a ticket,
// then collects finished reads (`reap`) or waits for one (`wait`, GIL released). Python reader threads would
// need the GIL around every read and its bookkeeping, which on a small machine delays the compute thread.
#include <torch/extension.h>

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>
#include <tuple>
#include <unordered_map>
#include <vector>

namespace {

struct Job {
  int fd;
  char* dst;
  int64_t nbytes;
  int64_t offset;
  bool drop_cache;  // posix_fadvise(DONTNEED) after the read (files without O_DIRECT)
  bool started = false;
  bool finished = false;
  int64_t done = 0;  // bytes read
  int error = 0;     // errno, or 0
  double seconds = 0.0;
};

class ReadPool {
 public:
  explicit ReadPool(int threads) {
    for (int i = 0; i < threads; ++i) workers_.emplace_back([this] { loop(); });
  }
  ~ReadPool() { close(); }

  int64_t submit(int fd, int64_t address, int64_t nbytes, int64_t offset, bool demand, bool drop_cache) {
    int64_t t;
    {
      py::gil_scoped_release nogil;  // a reader may hold the lock for a moment: let Python run meanwhile
      std::lock_guard<std::mutex> g(mu_);
      if (!closing_) {
        t = next_++;
        jobs_.emplace(t, Job{fd, reinterpret_cast<char*>(address), nbytes, offset, drop_cache});
        (demand ? demand_ : prefetch_).push_back(t);
      } else {
        t = -1;
      }
    }
    TORCH_CHECK(t >= 0, "the read pool is closed");
    work_.notify_one();
    return t;
  }

  // A queued prefetch becomes a demand read (the forward needs it now). False if it already started.
  bool prioritize(int64_t t) {
    std::lock_guard<std::mutex> g(mu_);
    for (auto it = prefetch_.begin(); it != prefetch_.end(); ++it) {
      if (*it == t) {
        prefetch_.erase(it);
        demand_.push_front(t);
        return true;
      }
    }
    return false;
  }

  // Reads submitted and not yet finished (queued or in flight).
  int64_t pending() {
    std::lock_guard<std::mutex> g(mu_);
    return static_cast<int64_t>(demand_.size() + prefetch_.size()) + in_flight_;
  }

  // Finished reads since the last call: (ticket, bytes read, errno, seconds); they are forgotten here.
  std::vector<std::tuple<int64_t, int64_t, int, double>> reap() {
    std::lock_guard<std::mutex> g(mu_);
    return take_finished();
  }

  // Wait (GIL released) until ticket t has finished, or until any read finishes when t < 0; then reap().
  std::vector<std::tuple<int64_t, int64_t, int, double>> wait(int64_t t) {
    py::gil_scoped_release nogil;
    std::unique_lock<std::mutex> l(mu_);
    if (t >= 0) {
      TORCH_CHECK(jobs_.count(t), "read ", t, " is unknown or was reaped already");
      finished_.wait(l, [&] { return jobs_.at(t).finished; });
    } else {
      finished_.wait(l, [&] { return finished_count_ > 0 || (demand_.empty() && prefetch_.empty() && !in_flight_); });
    }
    return take_finished();
  }

  void close() {
    {
      std::lock_guard<std::mutex> g(mu_);
      if (closing_) return;
      closing_ = true;
      work_.notify_all();
    }
    for (auto& w : workers_) w.join();  // they never take the GIL: at most the reads in flight to wait for
  }

 private:
  std::vector<std::tuple<int64_t, int64_t, int, double>> take_finished() {
    std::vector<std::tuple<int64_t, int64_t, int, double>> out;
    for (auto it = jobs_.begin(); it != jobs_.end();) {
      if (it->second.finished) {
        out.emplace_back(it->first, it->second.done, it->second.error, it->second.seconds);
        it = jobs_.erase(it);
      } else {
        ++it;
      }
    }
    finished_count_ = 0;
    return out;
  }

  void loop() {
    std::unique_lock<std::mutex> l(mu_);
    while (true) {
      // every queued read is done before the pool stops: a caller may be waiting for it
      work_.wait(l, [&] { return closing_ || !demand_.empty() || !prefetch_.empty(); });
      if (demand_.empty() && prefetch_.empty()) return;
      auto& q = demand_.empty() ? prefetch_ : demand_;
      int64_t t = q.front();
      q.pop_front();
      Job job = jobs_.at(t);
      ++in_flight_;
      l.unlock();
      auto t0 = std::chrono::steady_clock::now();
      int64_t done = 0;
      int error = 0;
      while (done < job.nbytes) {
        ssize_t n = pread(job.fd, job.dst + done, job.nbytes - done, job.offset + done);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) {
          error = n < 0 ? errno : 0;
          break;
        }
        done += n;
      }
      if (job.drop_cache && done == job.nbytes) posix_fadvise(job.fd, job.offset, job.nbytes, POSIX_FADV_DONTNEED);
      double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      l.lock();
      --in_flight_;
      Job& j = jobs_.at(t);
      j.finished = true;
      j.done = done;
      j.error = error;
      j.seconds = seconds;
      ++finished_count_;
      finished_.notify_all();
    }
  }

  std::mutex mu_;
  std::condition_variable work_, finished_;
  std::deque<int64_t> demand_, prefetch_;
  std::unordered_map<int64_t, Job> jobs_;
  std::vector<std::thread> workers_;
  int64_t next_ = 0;
  int64_t in_flight_ = 0;
  int64_t finished_count_ = 0;
  bool closing_ = false;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<ReadPool>(m, "ReadPool")
      .def(py::init<int>(), py::arg("threads"))
      .def("submit", &ReadPool::submit, py::arg("fd"), py::arg("address"), py::arg("nbytes"), py::arg("offset"),
           py::arg("demand"), py::arg("drop_cache"))
      .def("prioritize", &ReadPool::prioritize)
      .def("pending", &ReadPool::pending)
      .def("reap", &ReadPool::reap)
      .def("wait", &ReadPool::wait, py::arg("ticket") = -1)
      .def("close", &ReadPool::close);
}

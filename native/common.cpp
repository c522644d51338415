// The thread pool and array helpers of common.h.
#include "common.h"

#include <sched.h>

#include <condition_variable>
#include <mutex>
#include <sstream>
#include <thread>

namespace tcn {

namespace {

int usable_cores() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    return std::max(1, CPU_COUNT(&set));
  }
  return std::max(1u, std::thread::hardware_concurrency());
}

// Workers wait for a new generation, run their task, and report done. One
// run at a time (a second caller waits its turn). Never destroyed: threads
// blocked here must not outlive a destructor at interpreter exit.
class Pool {
 public:
  explicit Pool(int workers) {
    for (int w = 1; w <= workers; ++w) {
      std::thread([this, w] { loop(w); }).detach();
    }
  }

  void run(int n_tasks, const std::function<void(int)>& task) {
    std::lock_guard<std::mutex> one_run(run_mutex_);
    {
      std::lock_guard<std::mutex> lock(m_);
      task_ = &task;
      n_tasks_ = n_tasks;
      pending_ = n_tasks - 1;
      ++generation_;
    }
    wake_.notify_all();
    task(0);
    std::unique_lock<std::mutex> lock(m_);
    done_.wait(lock, [this] { return pending_ == 0; });
  }

 private:
  void loop(int w) {
    int seen = 0;
    for (;;) {
      std::unique_lock<std::mutex> lock(m_);
      wake_.wait(lock, [&] { return generation_ != seen; });
      seen = generation_;
      if (w >= n_tasks_) continue;
      auto* task = task_;
      lock.unlock();
      (*task)(w);
      lock.lock();
      if (--pending_ == 0) done_.notify_one();
    }
  }

  std::mutex run_mutex_, m_;
  std::condition_variable wake_, done_;
  const std::function<void(int)>* task_ = nullptr;
  int n_tasks_ = 0, pending_ = 0, generation_ = 0;
};

std::mutex pool_mutex;
int n_threads = 0;  // 0: not yet set
Pool* pool = nullptr;

}  // namespace

int threads() {
  std::lock_guard<std::mutex> lock(pool_mutex);
  if (n_threads == 0) n_threads = usable_cores();
  return n_threads;
}

void set_threads(int n) {
  if (n < 1) throw std::invalid_argument("threads must be >= 1");
  std::lock_guard<std::mutex> lock(pool_mutex);
  n_threads = n;
}

void run_tasks(int n_tasks, const std::function<void(int)>& task) {
  Pool* p;
  {
    std::lock_guard<std::mutex> lock(pool_mutex);
    // Grown, never shrunk: a smaller count just leaves workers idle.
    static int workers = 0;
    if (n_tasks - 1 > workers) {
      workers = n_tasks - 1;
      pool = new Pool(workers);
    }
    p = pool;
  }
  p->run(n_tasks, task);
}

void check_float32(const mx::array& a, const char* op, const char* what) {
  if (a.dtype() != mx::float32) {
    std::ostringstream msg;
    msg << op << ": " << what << " must be float32, got " << a.dtype();
    throw std::invalid_argument(msg.str());
  }
}

}  // namespace tcn

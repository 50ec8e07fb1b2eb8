// NativeBacking: one backing file or block device driven through one
// io_uring, with completions delivered to JS in batches from a uv_poll on an
// eventfd registered with the ring. See docs/NATIVE.md.
#pragma once

#include <liburing.h>
#include <napi.h>
#include <pthread.h>
#include <uv.h>

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "unique_fd.h"

namespace dmr {

enum OpCode : int {
  kOpRead = 0,
  kOpWrite = 1,
  kOpFdatasync = 2,
  kOpDiscard = 3,
  kOpWriteZeroes = 4,
  kOpTestHang = 100,  // test hook: the worker sleeps `length` ms (simulates a hung ioctl)
};
constexpr uint32_t kFlagFua = 1;
// user_data 0 is reserved for the close-time ASYNC_CANCEL request.
constexpr uint64_t kCancelUserData = 0;

struct Completion {
  uint64_t id;
  int32_t res;
};

struct WorkerJob {
  uint64_t id;
  int op;
  uint64_t offset;
  uint64_t length;
};

// State shared between the device (JS thread) and its ioctl worker thread.
// The worker holds its own shared_ptr, so a worker stuck in an ioctl on a hung
// device keeps the fd alive by itself after the device was closed (detached).
struct WorkerShared {
  UniqueFd fd;  // the backing fd; also used by the ring
  std::mutex mu;
  std::condition_variable jobsCv;
  std::condition_variable exitCv;
  std::deque<WorkerJob> jobs;
  std::vector<Completion> results;
  int eventFd = -1;       // owned by the device; valid only while !deviceGone
  bool stop = false;      // set by close()
  bool deviceGone = false;  // device closed: never touch eventFd again
  bool exited = false;
};

class NativeBacking : public Napi::ObjectWrap<NativeBacking> {
 public:
  static void Init(Napi::Env env, Napi::Object exports);
  explicit NativeBacking(const Napi::CallbackInfo& info);
  ~NativeBacking() override;
  NativeBacking(const NativeBacking&) = delete;
  NativeBacking& operator=(const NativeBacking&) = delete;

 private:
  Napi::Value Open(const Napi::CallbackInfo& info);
  Napi::Value Info(const Napi::CallbackInfo& info);
  Napi::Value Submit(const Napi::CallbackInfo& info);
  Napi::Value Cancel(const Napi::CallbackInfo& info);
  Napi::Value Close(const Napi::CallbackInfo& info);
  Napi::Value DupFd(const Napi::CallbackInfo& info);
  Napi::Value EnableTestHooks(const Napi::CallbackInfo& info);
  Napi::Value ErrorStage(const Napi::CallbackInfo& info);

  int OpenImpl(const std::string& path, bool direct, bool readOnly, bool exclusive, unsigned depth);
  int SetupRing(unsigned depth);
  io_uring_sqe* GetSqe();
  void PushImmediate(uint64_t id, int32_t res);
  int QueueWorkerJob(const WorkerJob& job);
  void SignalEventFd();
  void UpdateLoopRef();
  void Reap();
  struct CloseResult {
    uint32_t workerAbandoned = 0;
    bool workerDetached = false;
  };
  CloseResult CloseNative(int workerWaitMs, bool envTeardown = false);

  static void OnPoll(uv_poll_t* handle, int status, int events);
  static void OnPollClosed(uv_handle_t* handle);
  static void OnCheck(uv_check_t* handle);
  static void OnPrepare(uv_prepare_t* handle);
  static void OnHandleClosed(uv_handle_t* handle);
  void SubmitQueued();
  static void* WorkerMain(void* arg);
  static void EnvCleanup(void* arg);

  Napi::FunctionReference onComplete_;
  Napi::Reference<Napi::Float64Array> completionsRef_;
  size_t completionsCap_ = 0;  // (id, res) pairs
  size_t roundCap_ = 8;        // completions handed to JS per reap round (see Reap)
  std::unique_ptr<Napi::AsyncContext> asyncContext_;

  std::shared_ptr<WorkerShared> shared_;
  pthread_t worker_{};
  bool workerStarted_ = false;

  io_uring ring_{};
  bool ringInit_ = false;
  bool deferTaskrun_ = false;
  bool fixedFile_ = false;  // the fd is registered with the ring as file 0
  std::string ringSetup_;
  UniqueFd eventFd_;
  uv_poll_t* poll_ = nullptr;
  // Submit() only queues SQEs; these submit them once per loop phase (after
  // the poll phase, and before the loop blocks), so every request that
  // arrived in one phase goes down in one io_uring_enter.
  uv_check_t* check_ = nullptr;
  uv_prepare_t* prepare_ = nullptr;
  bool loopRefed_ = true;
  bool cleanupHookAdded_ = false;
  bool selfRefed_ = false;

  std::vector<Completion> immediate_;
  uint64_t inflight_ = 0;  // ring ops + worker jobs + immediates not yet delivered
  bool open_ = false;
  bool closed_ = false;
  bool testHooks_ = false;

  std::string path_;
  std::string errorStage_;
  uint64_t sizeBytes_ = 0;
  uint32_t logicalBlockSize_ = 512;
  uint32_t physicalBlockSize_ = 512;
  uint32_t memAlign_ = 512;  // O_DIRECT buffer address alignment we enforce
  bool isBlockDevice_ = false;
  bool direct_ = true;
  bool readOnly_ = false;
  uint64_t dev_ = 0, ino_ = 0, rdev_ = 0;
};

}  // namespace dmr

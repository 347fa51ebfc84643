// An emulated Ascend NPU for tests: torch's PrivateUse1 device (named "npu" by the torch_npu
// double) with tensors in host memory and torch's CPU kernels underneath. Written for this
// project; see tests/doubles/README.md and docs/ascend-emulator.md.
//
// What it registers:
//   * a device guard with NPU_EMULATOR_DEVICES devices (default 2), so the autograd engine, DDP
//     and torch.device("npu", 1) see several devices in one process;
//   * one allocator per device (host memory, allocation statistics) and a "pinned" host allocator;
//   * factory, copy, resize and set_ kernels; every other operator goes through one boxed fallback
//     that views the NPU tensors as CPU tensors (same memory, no copy), runs the CPU kernel and
//     hands NPU tensors back. The fallback refuses what an accelerator refuses: tensors of two
//     devices in one operator (a zero-dim CPU tensor is a scalar, as on CUDA and NPU);
//   * the SyncBatchNorm kernels (CPU has none), composed from CPU operators;
//   * autocast for the device: the lower-precision and float32 operator lists of CUDA autocast.
#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/_reshape_alias_native.h>
#include <ATen/ops/as_strided_native.h>
#include <ATen/ops/view_native.h>
#include <ATen/detail/PrivateUse1HooksInterface.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/csrc/distributed/c10d/reducer_timer.hpp>
#include <torch/library.h>
#include <torch/version.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <unordered_set>

#define EMU_OLD_TORCH (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR < 3)
#if EMU_OLD_TORCH  // torch 2.1/2.2: const allocate(), no copy_data(), noexcept stream queries
#define EMU_STREAM_NOEXCEPT noexcept
#define EMU_ALLOCATE_CONST const
#define EMU_COPY_DATA
#else
#define EMU_STREAM_NOEXCEPT
#define EMU_ALLOCATE_CONST
#define EMU_COPY_DATA                                                          \
  void copy_data(void* dest, const void* src, std::size_t count) const override { \
    std::memcpy(dest, src, count);                                             \
  }
#endif

namespace {

using c10::Device;
using c10::DeviceIndex;
using c10::DeviceType;

constexpr DeviceType kNpu = DeviceType::PrivateUse1;
constexpr int kMaxDevices = 8;

DeviceIndex device_count() {
  static const DeviceIndex count = [] {
    const char* text = std::getenv("NPU_EMULATOR_DEVICES");
    int n = text ? std::atoi(text) : 2;
    return static_cast<DeviceIndex>(std::max(1, std::min(n, kMaxDevices)));
  }();
  return count;
}

thread_local DeviceIndex current_device = 0;

void check_index(DeviceIndex index) {
  TORCH_CHECK(index >= 0 && index < device_count(), "Invalid device, must be within [0, ",
              static_cast<int>(device_count()), "), got npu:", static_cast<int>(index));
}

// ------------------------------------------------------------------------------ device guard

struct NpuGuard final : c10::impl::DeviceGuardImplInterface {
  DeviceType type() const override { return kNpu; }
  Device exchangeDevice(Device d) const override {
    Device old = getDevice();
    setDevice(d);
    return old;
  }
  Device getDevice() const override { return Device(kNpu, current_device); }
  void setDevice(Device d) const override {
    TORCH_CHECK(d.type() == kNpu, "expected an npu device, got ", d);
    if (d.has_index()) {
      check_index(d.index());
      current_device = d.index();
    }
  }
  void uncheckedSetDevice(Device d) const noexcept override {
    if (d.has_index()) current_device = d.index();
  }
  c10::Stream getStream(Device d) const EMU_STREAM_NOEXCEPT override {
    return c10::Stream(c10::Stream::DEFAULT, d);
  }
  c10::Stream exchangeStream(c10::Stream s) const EMU_STREAM_NOEXCEPT override { return s; }
  DeviceIndex deviceCount() const noexcept override { return device_count(); }
  // One stream per device and synchronous kernels: events are always complete.
  void destroyEvent(void*, const DeviceIndex) const noexcept override {}
  void record(void** event, const c10::Stream&, const DeviceIndex, const c10::EventFlag) const override {
    *event = reinterpret_cast<void*>(1);
  }
  void block(void*, const c10::Stream&) const override {}
  bool queryEvent(void*) const override { return true; }
  bool queryStream(const c10::Stream&) const override { return true; }
  void synchronizeStream(const c10::Stream&) const override {}
  void recordDataPtrOnStream(const c10::DataPtr&, const c10::Stream&) const override {}
};

C10_REGISTER_GUARD_IMPL(PrivateUse1, NpuGuard);

// ------------------------------------------------------------------------------ memory

struct Counters {
  std::atomic<int64_t> allocated{0};
  std::atomic<int64_t> peak{0};
};
Counters counters[kMaxDevices];

struct Block {
  size_t bytes;
  DeviceIndex device;
};

struct NpuAllocator final : c10::Allocator {
  DeviceIndex index = 0;
  c10::DataPtr allocate(size_t nbytes) EMU_ALLOCATE_CONST override {
    // header and data in one host block; the DataPtr's context is the header
    char* raw = static_cast<char*>(c10::alloc_cpu(nbytes + 64));
    auto* block = reinterpret_cast<Block*>(raw);
    block->bytes = nbytes;
    block->device = index;
    Counters& c = counters[index];
    int64_t now = (c.allocated += static_cast<int64_t>(nbytes));
    int64_t peak = c.peak.load();
    while (now > peak && !c.peak.compare_exchange_weak(peak, now)) {
    }
    return {raw + 64, block, &free_with_header, Device(kNpu, index)};
  }
  static void free_with_header(void* ctx) {
    auto* block = static_cast<Block*>(ctx);
    counters[block->device].allocated -= static_cast<int64_t>(block->bytes);
    c10::free_cpu(block);
  }
  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }
  EMU_COPY_DATA
};

NpuAllocator* allocator_for(DeviceIndex index) {
  static NpuAllocator* allocators = [] {
    auto* all = new NpuAllocator[kMaxDevices];
    for (int i = 0; i < kMaxDevices; ++i) all[i].index = static_cast<DeviceIndex>(i);
    return all;
  }();
  check_index(index);
  return &allocators[index];
}

// The allocator torch asks for by device type (e.g. storage(), UntypedStorage(device="npu")):
// the current device's.
struct CurrentDeviceAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t nbytes) EMU_ALLOCATE_CONST override {
    return allocator_for(current_device)->allocate(nbytes);
  }
  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }
  EMU_COPY_DATA
};
CurrentDeviceAllocator current_allocator;
REGISTER_ALLOCATOR(kNpu, &current_allocator);

// Page-locked host memory as the real device offers it: host memory whose address is remembered.
std::mutex pinned_mutex;
std::unordered_set<const void*> pinned_blocks;

void free_pinned(void* data) {
  {
    std::lock_guard<std::mutex> lock(pinned_mutex);
    pinned_blocks.erase(data);
  }
  c10::free_cpu(data);
}

struct PinnedAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t nbytes) EMU_ALLOCATE_CONST override {
    void* data = c10::alloc_cpu(nbytes);
    std::lock_guard<std::mutex> lock(pinned_mutex);
    pinned_blocks.insert(data);
    return {data, data, &free_pinned, Device(DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &free_pinned; }
  EMU_COPY_DATA
};
PinnedAllocator pinned_allocator;

bool is_pinned_ptr(const void* data) {
  std::lock_guard<std::mutex> lock(pinned_mutex);
  return pinned_blocks.count(data) > 0;
}

// ------------------------------------------------------------------------------ hooks

struct NpuHooks final : at::PrivateUse1HooksInterface {
#if EMU_OLD_TORCH
  at::Device getDeviceFromPtr(void*) const override { return Device(kNpu, current_device); }
#else
  bool isBuilt() const override { return true; }
  bool isAvailable() const override { return true; }
  bool hasPrimaryContext(DeviceIndex) const override { return true; }
  at::Device getDeviceFromPtr(void*) const override { return Device(kNpu, current_device); }
  bool isPinnedPtr(const void* data) const override { return is_pinned_ptr(data); }
  c10::Allocator* getPinnedMemoryAllocator() const override { return &pinned_allocator; }
  const at::Generator& getDefaultGenerator(DeviceIndex) const override {
    return at::detail::getDefaultCPUGenerator();  // random kernels run on the CPU
  }
  void resizePrivateUse1Bytes(const c10::Storage& storage, size_t newsize) const override;
#endif
};

// ------------------------------------------------------------------------------ NPU <-> CPU views

// A CPU tensor over the memory of an NPU tensor (same bytes, same geometry). Resizable with the
// CPU allocator so that an out= kernel may grow it; the caller notices and moves the result.
at::Tensor host_view(const at::Tensor& npu) {
  const c10::Storage& storage = npu.storage();
  TORCH_CHECK(npu.numel() == 0 ||
                  at::detail::computeStorageNbytes(npu.sizes(), npu.strides(), npu.dtype().itemsize(),
                                                   npu.storage_offset()) <= storage.nbytes(),
              "emulated NPU: a tensor reaches past the end of its storage");
  c10::DataPtr data(const_cast<void*>(storage.data()), Device(DeviceType::CPU));
  c10::Storage host(c10::Storage::use_byte_size_t(), storage.nbytes(), std::move(data),
                    c10::GetCPUAllocator(), /*resizable=*/true);
  auto view = at::detail::make_tensor<c10::TensorImpl>(std::move(host), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                                       npu.dtype());
  view.unsafeGetTensorImpl()->set_sizes_and_strides(npu.sizes(), npu.strides(), npu.storage_offset());
  return view;
}

// An NPU tensor over an NPU storage, with the geometry and dtype of `like`.
at::Tensor npu_over(const c10::Storage& storage, const at::Tensor& like) {
  auto out = at::detail::make_tensor<c10::TensorImpl>(c10::Storage(storage),
                                                      c10::DispatchKeySet(c10::DispatchKey::PrivateUse1), like.dtype());
  out.unsafeGetTensorImpl()->set_sizes_and_strides(like.sizes(), like.strides(), like.storage_offset());
  return out;
}

at::Tensor empty_on(DeviceIndex index, at::IntArrayRef size, at::IntArrayRef stride, at::ScalarType dtype) {
  return at::detail::empty_strided_generic(size, stride, allocator_for(index),
                                           c10::DispatchKeySet(c10::DispatchKey::PrivateUse1), dtype);
}

// A fresh NPU copy of a CPU tensor (same strides when they are dense, else contiguous).
at::Tensor to_npu(const at::Tensor& cpu, DeviceIndex index) {
  at::Tensor out = cpu.is_non_overlapping_and_dense()
                       ? empty_on(index, cpu.sizes(), cpu.strides(), cpu.scalar_type())
                       : empty_on(index, cpu.sizes(), c10::contiguous_strides(cpu.sizes()), cpu.scalar_type());
  host_view(out).copy_(cpu);
  return out;
}

DeviceIndex index_of(c10::optional<Device> device) {
  if (device.has_value() && device->has_index()) return device->index();
  return current_device;
}

// ------------------------------------------------------------------------------ kernels

at::Tensor npu_empty(at::IntArrayRef size, c10::optional<at::ScalarType> dtype, c10::optional<at::Layout>,
                     c10::optional<Device> device, c10::optional<bool>,
                     c10::optional<at::MemoryFormat> memory_format) {
  return at::detail::empty_generic(size, allocator_for(index_of(device)),
                                   c10::DispatchKeySet(c10::DispatchKey::PrivateUse1),
                                   c10::dtype_or_default(dtype), memory_format);
}

at::Tensor npu_empty_strided(at::IntArrayRef size, at::IntArrayRef stride, c10::optional<at::ScalarType> dtype,
                             c10::optional<at::Layout>, c10::optional<Device> device, c10::optional<bool>) {
  return empty_on(index_of(device), size, stride, c10::dtype_or_default(dtype));
}

at::Tensor as_host(const at::Tensor& t) { return t.device().type() == kNpu ? host_view(t) : t; }

at::Tensor npu_copy_from(const at::Tensor& self, const at::Tensor& dst, bool) {
  as_host(dst).copy_(as_host(self));
  return dst;
}

void resize_storage(const c10::Storage& storage, size_t nbytes, DeviceIndex index) {
  if (nbytes <= storage.nbytes()) return;
  c10::DataPtr fresh = allocator_for(index)->allocate(nbytes);
  if (storage.nbytes() > 0) std::memcpy(fresh.get(), storage.data(), storage.nbytes());
  storage.unsafeGetStorageImpl()->set_data_ptr_noswap(std::move(fresh));
  storage.unsafeGetStorageImpl()->set_nbytes(nbytes);
}

#if !EMU_OLD_TORCH
void NpuHooks::resizePrivateUse1Bytes(const c10::Storage& storage, size_t newsize) const {
  resize_storage(storage, newsize, storage.device().index());
}
#endif

const at::Tensor& npu_resize_(const at::Tensor& self, at::IntArrayRef size,
                              c10::optional<at::MemoryFormat> memory_format) {
  auto* impl = self.unsafeGetTensorImpl();
  auto format = memory_format.value_or(at::MemoryFormat::Contiguous);
  impl->set_sizes_contiguous(size);
  if (format != at::MemoryFormat::Preserve && format != at::MemoryFormat::Contiguous) {
    impl->empty_tensor_restride(format);
  }
  size_t needed = at::detail::computeStorageNbytes(self.sizes(), self.strides(), self.dtype().itemsize(),
                                                   self.storage_offset());
  resize_storage(self.storage(), needed, self.device().index());
  return self;
}

at::Tensor npu_copy_from_and_resize(const at::Tensor& self, const at::Tensor& dst) {
  npu_resize_(dst, self.sizes(), c10::nullopt);
  return npu_copy_from(self, dst, false);
}

at::Tensor& npu_set_storage(at::Tensor& self, c10::Storage source, int64_t offset, at::IntArrayRef size,
                            at::IntArrayRef stride) {
  TORCH_CHECK(source.device() == self.device(), "Expected a Storage of device ", self.device(),
              " but got a Storage of device ", source.device(), " for argument #1 'source' (while checking "
              "arguments for set_)");
  auto* impl = self.unsafeGetTensorImpl();
  impl->set_storage_keep_dtype(std::move(source));
  impl->set_storage_offset(offset);
  if (stride.empty()) {
    impl->set_sizes_contiguous(size);
  } else {
    impl->set_sizes_and_strides(size, stride);
  }
  // as on the CPU: a storage too small for the new geometry grows
  if (self.numel() > 0) {
    resize_storage(self.storage(),
                   at::detail::computeStorageNbytes(self.sizes(), self.strides(), self.dtype().itemsize(), offset),
                   self.device().index());
  }
  return self;
}

at::Tensor& npu_set_whole_storage(at::Tensor& self, c10::Storage source) {
  const int64_t numel = static_cast<int64_t>(source.nbytes() / self.dtype().itemsize());
  return npu_set_storage(self, std::move(source), 0, {numel}, {});
}

at::Tensor& npu_set_tensor(at::Tensor& self, const at::Tensor& source) {
  return npu_set_storage(self, source.storage(), source.storage_offset(), source.sizes(), source.strides());
}

at::Tensor& npu_set_empty(at::Tensor& self) {
  c10::Storage storage(c10::Storage::use_byte_size_t(), 0, allocator_for(self.device().index()), true);
  return npu_set_storage(self, storage, 0, {0}, {});
}

// Pinning (torch 2.1/2.2 dispatch it to the device named by the `device` argument).
bool npu_is_pinned(const at::Tensor& self, c10::optional<Device>) { return is_pinned_ptr(self.storage().data()); }

at::Tensor npu_pin_memory(const at::Tensor& self, c10::optional<Device>) {
  at::Tensor pinned = at::detail::empty_strided_generic(self.sizes(), self.strides(), &pinned_allocator,
                                                  c10::DispatchKeySet(c10::DispatchKey::CPU), self.scalar_type());
  pinned.copy_(self);
  return pinned;
}

// ------------------------------------------------------------------------------ the fallback

bool is_npu(const at::Tensor& t) { return t.defined() && t.device().type() == kNpu; }

// The one NPU device an operator runs on. CPU tensors are refused unless they are zero-dim
// (scalars) or entries of an optional-tensor list (indices of index/index_put_, which the real
// devices move themselves), as CUDA and NPU do.
void check_one_device(const std::vector<std::pair<at::Tensor, bool>>& tensors, const c10::OperatorName& op,
                      c10::optional<Device>& device) {
  for (const auto& [t, cpu_allowed] : tensors) {
    if (is_npu(t)) {
      device = t.device();
      break;
    }
  }
  if (!device.has_value()) return;  // a factory call on host tensors
  for (const auto& [t, cpu_allowed] : tensors) {
    if (t.device() == *device || (t.device().type() == DeviceType::CPU && (cpu_allowed || t.dim() == 0))) continue;
    TORCH_CHECK(false, "Expected all tensors to be on the same device, but found at least two devices, ", *device,
                " and ", t.device(), "! (", op.name, " on the emulated NPU)");
  }
}

struct Converted {
  at::Tensor npu;   // the argument as given
  at::Tensor host;  // its CPU view, handed to the CPU kernel
  const void* data;
};

at::Tensor back_to_npu(const at::Tensor& result, const std::vector<Converted>& args, DeviceIndex index) {
  if (!result.defined() || result.device().type() != DeviceType::CPU) return result;
  for (const auto& arg : args) {
    if (result.unsafeGetTensorImpl() == arg.host.unsafeGetTensorImpl()) {
      // in place or out=: the argument itself; an out= kernel may have moved it to new memory
      if (arg.host.storage().data() != arg.data || arg.host.sizes() != arg.npu.sizes() ||
          arg.host.strides() != arg.npu.strides()) {
        if (arg.host.storage().data() != arg.data) {
          npu_resize_(arg.npu, {0}, c10::nullopt);
          resize_storage(arg.npu.storage(), arg.host.storage().nbytes(), index);
          std::memcpy(const_cast<void*>(arg.npu.storage().data()), arg.host.storage().data(),
                      arg.host.storage().nbytes());
        }
        arg.npu.unsafeGetTensorImpl()->set_sizes_and_strides(arg.host.sizes(), arg.host.strides(),
                                                            arg.host.storage_offset());
      }
      return arg.npu;
    }
  }
  const void* data = result.storage().data();
  if (data != nullptr) {
    for (const auto& arg : args) {
      if (arg.data == data) return npu_over(arg.npu.storage(), result);  // a view of an argument
    }
  }
  return to_npu(result, index);
}

// Matrix products whose float16/bfloat16 versions run in float32 on the host, rounded back: CPU
// float16 GEMMs are ~30x slower than float32 ones here, and an NPU's cube unit accumulates in
// float32 too.
bool is_matrix_product(const c10::OperatorHandle& op) {
  static const std::unordered_set<std::string> names{
      "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm", "aten::mv", "aten::addmv",
      "aten::dot"};
  return names.count(op.schema().name()) > 0;
}

c10::optional<at::ScalarType> low_precision_argument(const std::vector<c10::IValue>& args) {
  for (const auto& value : args) {
    if (value.isTensor() && value.toTensor().defined()) {
      auto type = value.toTensor().scalar_type();
      if (type == at::kHalf || type == at::kBFloat16) return type;
    }
  }
  return c10::nullopt;
}

// The CPU kernel of `op` on the host arguments at stack[first:]. Matrix products in float16 or
// bfloat16, and operators whose CPU kernel lacks float16 (torch 2.1: softmax, ...), run in
// float32 on float32 copies; the results are rounded back (in place for a mutated argument).
void run_on_host(const c10::OperatorHandle& op, torch::jit::Stack* stack, size_t first) {
  std::vector<c10::IValue> args(stack->begin() + first, stack->end());
  c10::optional<at::ScalarType> low = is_matrix_product(op) ? low_precision_argument(args) : c10::nullopt;
  if (!low.has_value()) {
    try {
      op.redispatchBoxed(c10::DispatchKeySet(c10::DispatchKey::CPU), stack);
      return;
    } catch (const c10::Error& error) {
      if (std::string(error.what()).find("not implemented for 'Half'") == std::string::npos) throw;
    }
    low = at::kHalf;
  }
  stack->resize(first);
  std::vector<std::pair<at::Tensor, at::Tensor>> widened;  // (float32 copy, low-precision original)
  auto widen = [&](const at::Tensor& t) {
    if (!t.defined() || t.scalar_type() != *low) return t;
    widened.emplace_back(t.to(at::kFloat), t);
    return widened.back().first;
  };
  const auto& schema_args = op.schema().arguments();
  for (size_t i = 0; i < args.size(); ++i) {
    c10::IValue& value = args[i];
    auto type = schema_args[i].real_type();  // ScalarType, where type() says int
    if (auto optional = type->cast<c10::OptionalType>()) type = optional->getElementType();
    if (value.isTensor()) {
      value = widen(value.toTensor());
    } else if (type->kind() == c10::TypeKind::ScalarTypeType && value.isInt() &&
               value.toInt() == static_cast<int64_t>(*low)) {
      value = static_cast<int64_t>(at::kFloat);  // e.g. _softmax_backward_data's input_dtype
    } else if (value.isTensorList()) {
      c10::List<at::Tensor> list;
      for (const at::Tensor& t : value.toTensorVector()) list.push_back(widen(t));
      value = list;
    }
    stack->push_back(value);
  }
  op.redispatchBoxed(c10::DispatchKeySet(c10::DispatchKey::CPU), stack);
  for (size_t i = stack->size() - op.schema().returns().size(); i < stack->size(); ++i) {
    if (!(*stack)[i].isTensor()) continue;
    at::Tensor result = (*stack)[i].toTensor();
    bool mutated = false;
    for (auto& [copy, original] : widened) {
      if (result.unsafeGetTensorImpl() == copy.unsafeGetTensorImpl()) {
        original.copy_(copy);
        (*stack)[i] = original;
        mutated = true;
      }
    }
    if (!mutated && result.defined() && result.scalar_type() == at::kFloat) (*stack)[i] = result.to(*low);
  }
}

void npu_fallback(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const auto& schema = op.schema();
  const size_t num_args = schema.arguments().size();
  const size_t first = stack->size() - num_args;
  std::vector<std::pair<at::Tensor, bool>> tensors;  // (tensor, may stay on the CPU)
  std::vector<Converted> converted;
  auto convert = [&](const at::Tensor& t) -> at::Tensor {
    if (!is_npu(t)) return t;
    converted.push_back({t, host_view(t), t.storage().data()});
    return converted.back().host;
  };
  c10::optional<Device> device_arg;
  for (size_t i = first; i < stack->size(); ++i) {
    c10::IValue& value = (*stack)[i];
    if (value.isTensor()) {
      if (value.toTensor().defined()) tensors.emplace_back(value.toTensor(), false);
    } else if (value.isTensorList()) {
      for (const at::Tensor& t : value.toTensorVector()) tensors.emplace_back(t, false);
    } else if (value.isList()) {
      for (const c10::IValue& item : value.toListRef()) {
        if (item.isTensor() && item.toTensor().defined()) tensors.emplace_back(item.toTensor(), true);
      }
    } else if (value.isDevice() && value.toDevice().type() == kNpu) {
      device_arg = value.toDevice();
    }
  }
  c10::optional<Device> device;
  check_one_device(tensors, schema.operator_name(), device);
  const DeviceIndex index = device.has_value() ? device->index() : index_of(device_arg);
  for (size_t i = first; i < stack->size(); ++i) {
    c10::IValue& value = (*stack)[i];
    if (value.isTensor()) {
      value = convert(value.toTensor());
    } else if (value.isTensorList()) {
      auto list = value.toTensorList();
      c10::List<at::Tensor> host;
      for (const at::Tensor& t : list.vec()) host.push_back(convert(t));
      value = host;
    } else if (value.isList() && schema.arguments()[i - first].type()->str() == "Tensor?[]") {
      c10::List<c10::optional<at::Tensor>> host;
      for (const c10::IValue& item : value.toListRef()) {
        host.push_back(item.isTensor() ? c10::optional<at::Tensor>(convert(item.toTensor())) : c10::nullopt);
      }
      value = host;
    } else if (value.isDevice() && value.toDevice().type() == kNpu) {
      value = Device(DeviceType::CPU);  // a factory call: built on the host, then moved
    }
  }
  run_on_host(op, stack, first);
  const size_t num_returns = schema.returns().size();
  for (size_t i = stack->size() - num_returns; i < stack->size(); ++i) {
    c10::IValue& value = (*stack)[i];
    if (value.isTensor()) {
      value = back_to_npu(value.toTensor(), converted, index);
    } else if (value.isTensorList()) {
      c10::List<at::Tensor> out;
      for (const at::Tensor& t : value.toTensorVector()) out.push_back(back_to_npu(t, converted, index));
      value = out;
    }
  }
}

// ------------------------------------------------------------------------------ convolution

// torch routes convolutions of devices it does not know to these two "overrideable" operators.
// They run torch's CPU convolution on host views; float16/bfloat16 ones in float32 (as matrix
// products above), the results rounded back by the caller.
template <typename Fn>
auto on_host_widened(const std::vector<at::Tensor>& tensors, Fn fn) {
  std::vector<at::Tensor> host;
  for (const auto& t : tensors) {
    at::Tensor h = t.defined() ? as_host(t) : t;
    if (h.defined() && (h.scalar_type() == at::kHalf || h.scalar_type() == at::kBFloat16)) h = h.to(at::kFloat);
    host.push_back(h);
  }
  return fn(host);
}

void check_same_device(const char* op, const std::vector<at::Tensor>& tensors) {
  std::vector<std::pair<at::Tensor, bool>> seen;
  for (const auto& t : tensors) {
    if (t.defined()) seen.emplace_back(t, false);
  }
  c10::optional<Device> device;
  check_one_device(seen, c10::OperatorName(op, ""), device);
}

at::Tensor back_to(const at::Tensor& result, const at::Tensor& like) {
  if (!result.defined()) return result;
  return to_npu(result.to(like.scalar_type()), like.device().index());
}

at::Tensor npu_convolution(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                           at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                           bool transposed, at::IntArrayRef output_padding, int64_t groups) {
  at::Tensor b = bias.has_value() ? *bias : at::Tensor();
  check_same_device("aten::convolution", {input, weight, b});
  at::Tensor out = on_host_widened({input, weight, b}, [&](const std::vector<at::Tensor>& h) {
    return at::convolution(h[0], h[1], h[2].defined() ? c10::optional<at::Tensor>(h[2]) : c10::nullopt, stride,
                           padding, dilation, transposed, output_padding, groups);
  });
  return back_to(out, input);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> npu_convolution_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, bool transposed, at::IntArrayRef output_padding,
    int64_t groups, std::array<bool, 3> output_mask) {
  check_same_device("aten::convolution_backward", {grad_output, input, weight});
  std::vector<int64_t> bias_sizes{transposed ? weight.size(1) * groups : weight.size(0)};
  auto grads = on_host_widened({grad_output, input, weight}, [&](const std::vector<at::Tensor>& h) {
    return at::convolution_backward(h[0], h[1], h[2], bias_sizes, stride, padding, dilation, transposed,
                                    output_padding, groups, output_mask);
  });
  return {back_to(std::get<0>(grads), input), back_to(std::get<1>(grads), weight),
          back_to(std::get<2>(grads), weight)};
}

// ------------------------------------------------------------------------------ SyncBatchNorm

std::vector<int64_t> reduce_dims(const at::Tensor& input) {
  std::vector<int64_t> dims{0};
  for (int64_t d = 2; d < input.dim(); ++d) dims.push_back(d);
  return dims;
}

at::Tensor channel_shape(const at::Tensor& per_channel, const at::Tensor& input) {
  std::vector<int64_t> shape(input.dim(), 1);
  shape[1] = input.size(1);
  return per_channel.reshape(shape);
}

std::tuple<at::Tensor, at::Tensor> npu_batch_norm_stats(const at::Tensor& input, double eps) {
  at::Tensor x = input.to(at::kFloat);
  auto dims = reduce_dims(x);
  at::Tensor mean = x.mean(dims);
  at::Tensor var = (x - channel_shape(mean, x)).square().mean(dims);
  return {mean, (var + eps).rsqrt()};
}

std::tuple<at::Tensor, at::Tensor> npu_batch_norm_gather_stats_with_counts(
    const at::Tensor& input, const at::Tensor& mean, const at::Tensor& invstd,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var, double momentum,
    double eps, const at::Tensor& counts) {
  at::Tensor count = counts.to(at::kFloat).unsqueeze(1);  // [world, 1]
  at::Tensor total = count.sum();
  at::Tensor global_mean = (mean * count).sum(0) / total;
  at::Tensor var = invstd.reciprocal().square() - eps;
  at::Tensor global_var = (count * (var + (mean - global_mean).square())).sum(0) / total;
  if (running_mean.has_value() && running_mean->defined()) {
    running_mean->mul_(1 - momentum).add_(global_mean.to(running_mean->scalar_type()), momentum);
  }
  if (running_var.has_value() && running_var->defined()) {
    at::Tensor unbiased = global_var * total / (total - 1);
    running_var->mul_(1 - momentum).add_(unbiased.to(running_var->scalar_type()), momentum);
  }
  return {global_mean, (global_var + eps).rsqrt()};
}

at::Tensor npu_batch_norm_elemt(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                                const c10::optional<at::Tensor>& bias, const at::Tensor& mean,
                                const at::Tensor& invstd, double) {
  at::Tensor out = (input.to(at::kFloat) - channel_shape(mean, input)) * channel_shape(invstd, input);
  if (weight.has_value() && weight->defined()) out = out * channel_shape(weight->to(at::kFloat), input);
  if (bias.has_value() && bias->defined()) out = out + channel_shape(bias->to(at::kFloat), input);
  return out.to(input.scalar_type()).contiguous(input.suggest_memory_format());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> npu_batch_norm_backward_reduce(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean, const at::Tensor& invstd,
    const c10::optional<at::Tensor>& weight, bool input_g, bool weight_g, bool bias_g) {
  auto dims = reduce_dims(input);
  at::Tensor dy = grad_out.to(at::kFloat);
  at::Tensor sum_dy = dy.sum(dims);
  at::Tensor sum_dy_xmu = (dy * (input.to(at::kFloat) - channel_shape(mean, input))).sum(dims);
  at::Tensor grad_weight, grad_bias;
  at::ScalarType param_type = (weight.has_value() && weight->defined()) ? weight->scalar_type() : at::kFloat;
  if (weight_g) grad_weight = (sum_dy_xmu * invstd).to(param_type);
  if (bias_g) grad_bias = sum_dy.to(param_type);
  if (!input_g) sum_dy = sum_dy_xmu = at::Tensor();
  return {sum_dy, sum_dy_xmu, grad_weight, grad_bias};
}

at::Tensor npu_batch_norm_backward_elemt(const at::Tensor& grad_out, const at::Tensor& input,
                                         const at::Tensor& mean, const at::Tensor& invstd,
                                         const c10::optional<at::Tensor>& weight, const at::Tensor& sum_dy,
                                         const at::Tensor& sum_dy_xmu, const at::Tensor& count) {
  at::Tensor total = count.to(at::kFloat).sum();
  at::Tensor mean_dy = channel_shape(sum_dy / total, input);
  at::Tensor mean_dy_xmu = channel_shape(sum_dy_xmu / total, input);
  at::Tensor istd = channel_shape(invstd, input);
  at::Tensor xmu = input.to(at::kFloat) - channel_shape(mean, input);
  at::Tensor grad = (grad_out.to(at::kFloat) - mean_dy - xmu * istd.square() * mean_dy_xmu) * istd;
  if (weight.has_value() && weight->defined()) grad = grad * channel_shape(weight->to(at::kFloat), input);
  return grad.to(input.scalar_type()).contiguous(input.suggest_memory_format());
}

// torch_npu.npu_change_data_ptr, as its fused optimizers use it: `dst` keeps its storage object
// (so autograd, DDP and the optimizer still know it) whose memory becomes src's, `offset`
// elements in. The storage of `src` stays alive while dst uses it.
void change_data_ptr(const at::Tensor& dst, const at::Tensor& src, int64_t offset) {
  TORCH_CHECK(is_npu(dst) && is_npu(src), "npu_change_data_ptr: tensors must be on the NPU");
  TORCH_CHECK(dst.scalar_type() == src.scalar_type(), "npu_change_data_ptr: dst and src must have the same dtype");
  TORCH_CHECK(offset >= 0 && (offset + static_cast<int64_t>(dst.storage().nbytes() / dst.dtype().itemsize())) *
                                     static_cast<int64_t>(src.dtype().itemsize()) <=
                                 static_cast<int64_t>(src.storage().nbytes()),
              "npu_change_data_ptr: dst does not fit in src at offset ", offset);
  char* data = static_cast<char*>(const_cast<void*>(src.storage().data())) + offset * src.dtype().itemsize();
  auto* keep = new c10::Storage(src.storage());
  c10::DataPtr pointer(data, keep, [](void* ctx) { delete static_cast<c10::Storage*>(ctx); }, src.device());
  dst.storage().unsafeGetStorageImpl()->set_data_ptr_noswap(std::move(pointer));
}

// ------------------------------------------------------------------------------ queries from Python

int64_t memory_allocated(int64_t device) { check_index(device); return counters[device].allocated.load(); }
int64_t max_memory_allocated(int64_t device) { check_index(device); return counters[device].peak.load(); }
void reset_peak_memory_stats(int64_t device) {
  check_index(device);
  counters[device].peak = counters[device].allocated.load();
}
int64_t emulated_device_count() { return device_count(); }
void set_current_device(int64_t device) {
  check_index(device);
  current_device = static_cast<DeviceIndex>(device);
}
int64_t get_current_device() { return current_device; }

// torch 2.1 keeps the PrivateUse1 autocast state behind functions of its own name
bool autocast_enabled() {
#if EMU_OLD_TORCH
  return at::autocast::is_privateuseone_enabled();
#else
  return at::autocast::is_autocast_enabled(kNpu);
#endif
}
void set_autocast_enabled(bool enabled) {
#if EMU_OLD_TORCH
  at::autocast::set_privateuseone_enabled(enabled);
#else
  at::autocast::set_autocast_enabled(kNpu, enabled);
#endif
}
void set_autocast_dtype(at::ScalarType dtype) {
#if EMU_OLD_TORCH
  at::autocast::set_autocast_privateuseone_dtype(dtype);
#else
  at::autocast::set_autocast_dtype(kNpu, dtype);
#endif
}

// DDP's step timing (its logger asks every device type for a timer): host clock, as on the CPU.
struct NpuTimer final : c10d::Timer {
  explicit NpuTimer(c10::Device) {}
  c10::optional<int64_t> measureDifference(Event start, Event end) override {
    int64_t from = getTimeRef(start), to = getTimeRef(end);
    if (from == c10d::kUnsetTime || to == c10d::kUnsetTime || to < from) return c10::nullopt;
    return to - from;
  }
};

NpuHooks hooks;
struct RegisterHooks {
  RegisterHooks() { at::RegisterPrivateUse1HooksInterface(&hooks); }
} register_hooks;

}  // namespace

namespace c10d {
C10_REGISTER_TYPED_CLASS(TimerRegistry, c10::kPrivateUse1, NpuTimer);
}  // namespace c10d

TORCH_LIBRARY(npu_emulator, m) {
  m.def("device_count() -> int", &emulated_device_count);
  m.def("set_device(int device) -> ()", &set_current_device);
  m.def("change_data_ptr(Tensor dst, Tensor src, int offset) -> ()", &change_data_ptr);
  m.def("current_device() -> int", &get_current_device);
  m.def("autocast_enabled() -> bool", &autocast_enabled);
  m.def("set_autocast_enabled(bool enabled) -> ()", &set_autocast_enabled);
  m.def("set_autocast_dtype(ScalarType dtype) -> ()", &set_autocast_dtype);
  m.def("memory_allocated(int device) -> int", &memory_allocated);
  m.def("max_memory_allocated(int device) -> int", &max_memory_allocated);
  m.def("reset_peak_memory_stats(int device) -> ()", &reset_peak_memory_stats);
}

TORCH_LIBRARY_IMPL(_, PrivateUse1, m) {
  m.fallback(torch::CppFunction::makeFromBoxedFunction<&npu_fallback>());
}

TORCH_LIBRARY_IMPL(aten, PrivateUse1, m) {
  m.impl("empty.memory_format", &npu_empty);
  m.impl("empty_strided", &npu_empty_strided);
  m.impl("_copy_from", &npu_copy_from);
  m.impl("_copy_from_and_resize", &npu_copy_from_and_resize);
  m.impl("resize_", &npu_resize_);
  m.impl("set_.source_Storage_storage_offset", &npu_set_storage);
  m.impl("set_.source_Storage", &npu_set_whole_storage);
  m.impl("set_.source_Tensor", &npu_set_tensor);
  m.impl("set_", &npu_set_empty);
  m.impl("as_strided", TORCH_FN(at::native::as_strided_tensorimpl));
  m.impl("view", TORCH_FN(at::native::view));
  m.impl("_reshape_alias", TORCH_FN(at::native::_reshape_alias));
#if EMU_OLD_TORCH
  m.impl("is_pinned", &npu_is_pinned);
  m.impl("_pin_memory", &npu_pin_memory);
#endif
  m.impl("convolution_overrideable", &npu_convolution);
  m.impl("convolution_backward_overrideable", &npu_convolution_backward);
  m.impl("batch_norm_stats", &npu_batch_norm_stats);
  m.impl("batch_norm_gather_stats_with_counts", &npu_batch_norm_gather_stats_with_counts);
  m.impl("batch_norm_elemt", &npu_batch_norm_elemt);
  m.impl("batch_norm_backward_reduce", &npu_batch_norm_backward_reduce);
  m.impl("batch_norm_backward_elemt", &npu_batch_norm_backward_elemt);
}

// Autocast on the emulated NPU: CUDA autocast's lists (torch_npu registers the same kind of lists
// for the real device): matrix products and convolutions in the lower precision, reductions,
// normalisations, losses and transcendental functions in float32, mixed inputs promoted.
#if EMU_OLD_TORCH
#define LOWER(OP) KERNEL_PRIVATEUSEONE(OP, lower_precision_fp)
#define LOWER2(OP, OVERLOAD) KERNEL_PRIVATEUSEONE2(OP, OVERLOAD, lower_precision_fp)
#define FP32(OP) KERNEL_PRIVATEUSEONE(OP, fp32)
#define FP32_2(OP, OVERLOAD) KERNEL_PRIVATEUSEONE2(OP, OVERLOAD, fp32)
#define PROMOTE(OP) KERNEL_PRIVATEUSEONE(OP, promote)
#define PROMOTE2(OP, OVERLOAD) KERNEL_PRIVATEUSEONE2(OP, OVERLOAD, promote)
#else
#define LOWER(OP) KERNEL_PRIVATEUSEONE(OP, lower_precision_fp)
#define LOWER2(OP, OVERLOAD) KERNEL_PRIVATEUSEONE(OP, OVERLOAD, lower_precision_fp)
#define FP32(OP) KERNEL_PRIVATEUSEONE(OP, fp32)
#define FP32_2(OP, OVERLOAD) KERNEL_PRIVATEUSEONE(OP, OVERLOAD, fp32)
#define PROMOTE(OP) KERNEL_PRIVATEUSEONE(OP, promote)
#define PROMOTE2(OP, OVERLOAD) KERNEL_PRIVATEUSEONE(OP, OVERLOAD, promote)
#endif

namespace at::autocast {
namespace {
TORCH_LIBRARY_IMPL(_, AutocastPrivateUse1, m) { m.fallback(torch::CppFunction::makeFallthrough()); }

TORCH_LIBRARY_IMPL(aten, AutocastPrivateUse1, m) {
  LOWER(conv1d) LOWER(conv2d) LOWER(conv3d) LOWER(conv_transpose1d) LOWER2(conv_transpose2d, input)
  LOWER(convolution) LOWER(_convolution) LOWER(matmul) LOWER(mm) LOWER(mv) LOWER(linear) LOWER(addmm)
  LOWER(addmv) LOWER(addr) LOWER(bmm) LOWER(baddbmm) LOWER(addbmm) LOWER(chain_matmul) LOWER(prelu)
  LOWER(_native_multi_head_attention) LOWER(scaled_dot_product_attention)
  FP32(acos) FP32(asin) FP32(cosh) FP32(erfinv) FP32(exp) FP32(expm1) FP32(log) FP32(log10) FP32(log2)
  FP32(log1p) FP32(reciprocal) FP32(rsqrt) FP32(sinh) FP32(tan) FP32_2(pow, Tensor_Scalar)
  FP32_2(pow, Tensor_Tensor) FP32_2(pow, Scalar) FP32(softplus) FP32(layer_norm) FP32(native_layer_norm)
  FP32(group_norm) FP32_2(norm, Scalar) FP32_2(norm, ScalarOpt_dim) FP32(cosine_similarity)
  FP32(poisson_nll_loss) FP32(cosine_embedding_loss) FP32(nll_loss) FP32(nll_loss2d)
  FP32(hinge_embedding_loss) FP32(kl_div) FP32(l1_loss) FP32(smooth_l1_loss) FP32(huber_loss)
  FP32(mse_loss) FP32(margin_ranking_loss) FP32(multilabel_margin_loss) FP32(soft_margin_loss)
  FP32(triplet_margin_loss) FP32(multi_margin_loss) FP32(binary_cross_entropy_with_logits) FP32(dist)
  FP32(pdist) FP32(cdist) FP32(renorm) FP32(logsumexp) FP32_2(softmax, int) FP32_2(log_softmax, int)
  FP32(cross_entropy_loss) FP32(cumsum) FP32(cumprod) FP32(sum) FP32(prod)
  PROMOTE(addcdiv) PROMOTE(addcmul) PROMOTE(atan2) PROMOTE(bilinear) PROMOTE(cross) PROMOTE(dot)
  PROMOTE(grid_sampler) PROMOTE(index_put) PROMOTE(tensordot) PROMOTE(scatter_add) PROMOTE(cat)
  PROMOTE(stack)
}
}  // namespace
}  // namespace at::autocast

# Optional CUDA kernels without nvcc (FLOWPERT_WITH_CUDA=ON).
#
# torch 2.9.1 wheels are built against CUDA 12.8, and the machine's nvcc is CUDA 13. Instead of a
# CUDA-language CMake project, the kernels (csrc/cuda/kernels.cu) are compiled at build time by
# NVRTC 12.8 (the nvidia-cuda-nvrtc-cu12 wheel torch depends on) into cubins + PTX, embedded in a
# generated header, and launched from C++ host code through the CUDA 12 runtime library API
# (libcudart.so.12 and headers from the nvidia-cuda-runtime-cu12 wheel). cuda_runtime_api.h also
# needs crt/host_defines.h, which only the nvidia-cuda-nvcc-cu12 wheel ships:
#   pip install nvidia-cuda-nvcc-cu12==12.8.93     (or set FLOWPERT_CUDA_CRT_INCLUDE to its include/)
#
# Inputs: Python3_EXECUTABLE (the torch environment), FLOWPERT_CUDA_ARCHS (cubin targets).
set(FLOWPERT_CUDA_ARCHS "80;86;89;90;100;120" CACHE STRING "SM architectures to embed cubins for (first one also as PTX)")

set(FLOWPERT_CUDA_CRT_INCLUDE "" CACHE PATH "Directory holding crt/host_defines.h (CUDA 12); default: the nvidia-cuda-nvcc-cu12 wheel")

# Directories of the nvidia wheels, as seen by the torch environment's Python.
execute_process(
  COMMAND ${Python3_EXECUTABLE} -c "import importlib.util as u\nfor m in ('nvidia.cuda_nvrtc', 'nvidia.cuda_runtime', 'nvidia.cuda_nvcc'):\n    s = u.find_spec(m)\n    print(list(s.submodule_search_locations)[0] if s else 'NOTFOUND')"
  OUTPUT_VARIABLE _fp_wheels OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE _fp_rc)
if(NOT _fp_rc EQUAL 0 OR _fp_wheels MATCHES "^NOTFOUND")
  message(FATAL_ERROR "FLOWPERT_WITH_CUDA: nvidia-cuda-nvrtc-cu12 / nvidia-cuda-runtime-cu12 not found by ${Python3_EXECUTABLE}")
endif()
string(REPLACE "\n" ";" _fp_wheels "${_fp_wheels}")
list(GET _fp_wheels 0 FLOWPERT_NVRTC_DIR)
list(GET _fp_wheels 1 FLOWPERT_CUDART_DIR)
list(GET _fp_wheels 2 FLOWPERT_NVCC_DIR)
if(NOT FLOWPERT_CUDA_CRT_INCLUDE)
  set(FLOWPERT_CUDA_CRT_INCLUDE ${FLOWPERT_NVCC_DIR}/include)
endif()
if(NOT EXISTS ${FLOWPERT_CUDA_CRT_INCLUDE}/crt/host_defines.h)
  message(FATAL_ERROR "FLOWPERT_WITH_CUDA: crt/host_defines.h not found; pip install nvidia-cuda-nvcc-cu12==12.8.93 "
                      "or set FLOWPERT_CUDA_CRT_INCLUDE")
endif()
find_file(FLOWPERT_NVRTC_LIB libnvrtc.so.12 PATHS ${FLOWPERT_NVRTC_DIR}/lib NO_DEFAULT_PATH REQUIRED)
find_file(FLOWPERT_CUDART_LIB libcudart.so.12 PATHS ${FLOWPERT_CUDART_DIR}/lib NO_DEFAULT_PATH REQUIRED)
find_path(FLOWPERT_NVRTC_INCLUDE nvrtc.h PATHS ${FLOWPERT_NVRTC_DIR}/include NO_DEFAULT_PATH REQUIRED)
find_path(FLOWPERT_CUDART_INCLUDE cuda_runtime_api.h PATHS ${FLOWPERT_CUDART_DIR}/include NO_DEFAULT_PATH REQUIRED)
message(STATUS "flowpert CUDA: NVRTC ${FLOWPERT_NVRTC_LIB}, runtime ${FLOWPERT_CUDART_LIB}, archs ${FLOWPERT_CUDA_ARCHS}")

# Present torch's cmake config with the wheel's runtime (it then skips its own toolkit search).
add_library(torch::cudart INTERFACE IMPORTED)
set_target_properties(torch::cudart PROPERTIES
  INTERFACE_LINK_LIBRARIES ${FLOWPERT_CUDART_LIB}
  INTERFACE_INCLUDE_DIRECTORIES "${FLOWPERT_CUDART_INCLUDE};${FLOWPERT_CUDA_CRT_INCLUDE}")

# Build-time compiler: kernels.cu -> flowpert_cuda_images.h
add_executable(flowpert_nvrtc_embed csrc/cuda/nvrtc_embed.cpp)
target_include_directories(flowpert_nvrtc_embed PRIVATE ${FLOWPERT_NVRTC_INCLUDE})
target_link_libraries(flowpert_nvrtc_embed PRIVATE ${FLOWPERT_NVRTC_LIB})
set(_fp_images ${CMAKE_CURRENT_BINARY_DIR}/generated/flowpert_cuda_images.h)
add_custom_command(
  OUTPUT ${_fp_images}
  COMMAND ${CMAKE_COMMAND} -E make_directory ${CMAKE_CURRENT_BINARY_DIR}/generated
  COMMAND flowpert_nvrtc_embed ${_fp_images} ${CMAKE_CURRENT_SOURCE_DIR}/csrc/cuda/kernels.cu
          ${CMAKE_CURRENT_SOURCE_DIR}/csrc ${FLOWPERT_CUDA_ARCHS}
  DEPENDS flowpert_nvrtc_embed csrc/cuda/kernels.cu csrc/philox.h
  COMMENT "NVRTC: compiling CUDA kernels for sm ${FLOWPERT_CUDA_ARCHS}")

function(flowpert_add_cuda target)
  target_sources(${target} PRIVATE csrc/cuda/noise_cuda.cpp ${_fp_images})
  target_include_directories(${target} PRIVATE ${CMAKE_CURRENT_BINARY_DIR}/generated ${FLOWPERT_CUDART_INCLUDE}
                             ${FLOWPERT_CUDA_CRT_INCLUDE})
  target_compile_definitions(${target} PRIVATE FLOWPERT_WITH_CUDA)
  target_link_libraries(${target} PRIVATE ${FLOWPERT_CUDART_LIB})
endfunction()

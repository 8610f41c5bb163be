# Optional CUDA kernels without nvcc (FLOWPERT_WITH_CUDA=ON).
#
# The kernels (csrc/cuda/kernels.cu) are compiled at build time by NVRTC into cubins + PTX,
# embedded in a generated header, and launched from C++ host code through the CUDA runtime's
# library API. Everything must be of torch's CUDA major version (torch 2.9.1 wheels: CUDA 12.8,
# while this machine's nvcc is CUDA 13), so cmake/flowpert_cuda_toolchain.py looks for NVRTC, the
# runtime and crt/host_defines.h (which cuda_runtime_api.h includes) of that version: first in the
# nvidia wheels of the torch environment (nvidia-cuda-nvrtc-cu12 and nvidia-cuda-runtime-cu12 come
# with torch; crt/ only with nvidia-cuda-nvcc-cu12, pinned in requirements.txt), then in a CUDA
# toolkit of the same major version ($FLOWPERT_CUDA_ROOT, $CUDA_HOME, /usr/local/cuda).
#
# Inputs: Python3_EXECUTABLE (the torch environment), FLOWPERT_CUDA_ARCHS (cubin targets),
# FLOWPERT_CUDA_CRT_INCLUDE (optional override of the crt/ folder).
set(FLOWPERT_CUDA_ARCHS "80;86;89;90;100;120" CACHE STRING "SM architectures to embed cubins for (first one also as PTX)")
set(FLOWPERT_CUDA_CRT_INCLUDE "" CACHE PATH "Directory holding crt/host_defines.h; default: found with the toolchain")

execute_process(
  COMMAND ${Python3_EXECUTABLE} ${CMAKE_CURRENT_LIST_DIR}/flowpert_cuda_toolchain.py
          --crt-include=${FLOWPERT_CUDA_CRT}
  OUTPUT_VARIABLE _fp_out ERROR_VARIABLE _fp_err RESULT_VARIABLE _fp_rc OUTPUT_STRIP_TRAILING_WHITESPACE)
if(NOT _fp_rc EQUAL 0)
  message(FATAL_ERROR "FLOWPERT_WITH_CUDA: toolchain lookup failed with ${Python3_EXECUTABLE}: ${_fp_err}")
endif()
string(REPLACE "\n" ";" _fp_lines "${_fp_out}")
foreach(_fp_line IN LISTS _fp_lines)
  if(_fp_line MATCHES "^([A-Z_]+)=(.*)$")
    set(_fp_${CMAKE_MATCH_1} "${CMAKE_MATCH_2}")
  endif()
endforeach()
if(DEFINED _fp_ERROR)
  message(FATAL_ERROR "FLOWPERT_WITH_CUDA: ${_fp_ERROR}")
endif()
set(FLOWPERT_NVRTC_LIB ${_fp_NVRTC_LIB})
set(FLOWPERT_NVRTC_INCLUDE ${_fp_NVRTC_INCLUDE})
set(FLOWPERT_CUDART_LIB ${_fp_CUDART_LIB})
set(FLOWPERT_CUDART_INCLUDE ${_fp_CUDART_INCLUDE})
set(FLOWPERT_CUDA_CRT ${_fp_CRT_INCLUDE})
message(STATUS "flowpert CUDA: NVRTC ${FLOWPERT_NVRTC_LIB}, runtime ${FLOWPERT_CUDART_LIB}, crt ${FLOWPERT_CUDA_CRT} "
               "(CUDA ${_fp_CUDA_VERSION}, as torch), archs ${FLOWPERT_CUDA_ARCHS}")

# Present torch's cmake config with the wheel's runtime (it then skips its own toolkit search).
add_library(torch::cudart INTERFACE IMPORTED)
set_target_properties(torch::cudart PROPERTIES
  INTERFACE_LINK_LIBRARIES ${FLOWPERT_CUDART_LIB}
  INTERFACE_INCLUDE_DIRECTORIES "${FLOWPERT_CUDART_INCLUDE};${FLOWPERT_CUDA_CRT}")

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
                             ${FLOWPERT_CUDA_CRT})
  target_compile_definitions(${target} PRIVATE FLOWPERT_WITH_CUDA)
  target_link_libraries(${target} PRIVATE ${FLOWPERT_CUDART_LIB})
endfunction()

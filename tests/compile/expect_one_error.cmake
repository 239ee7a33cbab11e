# Builds TARGET in BUILD_DIR, which must fail with exactly one "error:" line, containing EXPECT.
#   cmake -DBUILD_DIR=... -DTARGET=... -DEXPECT=... -P expect_one_error.cmake
execute_process(COMMAND ${CMAKE_COMMAND} --build ${BUILD_DIR} --target ${TARGET}
                RESULT_VARIABLE status OUTPUT_VARIABLE out ERROR_VARIABLE err)
set(all "${out}${err}")
if(status EQUAL 0)
  message(FATAL_ERROR "${TARGET} compiled; it must not")
endif()
string(REGEX MATCHALL "error:[^\n]*" errors "${all}")
list(LENGTH errors count)
string(FIND "${all}" "${EXPECT}" at)
if(NOT count EQUAL 1 OR at EQUAL -1)
  message(FATAL_ERROR "expected one error saying '${EXPECT}', got ${count}:\n${all}")
endif()
message(STATUS "one error, as expected: ${errors}")

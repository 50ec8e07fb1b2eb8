// ublk uapi definitions missing from older <linux/ublk_cmd.h> headers.
//
// Debian bookworm ships the 6.1 header, which has the legacy opcodes and the
// 6.1 structures only. The numbers below are the kernel's ABI as of Linux
// 6.12 (include/uapi/linux/ublk_cmd.h: CMD_IOCTL_ENCODE since 6.4, USER_COPY
// and GET_FEATURES since 6.5); they are defined here only when the installed
// header lacks them, so a newer header always wins.
#pragma once

#include <linux/ioctl.h>
#include <linux/ublk_cmd.h>

#ifndef UBLK_F_UNPRIVILEGED_DEV
#define UBLK_F_UNPRIVILEGED_DEV (1ULL << 5)
#endif
#ifndef UBLK_F_CMD_IOCTL_ENCODE
#define UBLK_F_CMD_IOCTL_ENCODE (1ULL << 6)
#endif
#ifndef UBLK_F_USER_COPY
#define UBLK_F_USER_COPY (1ULL << 7)
#endif

// Control commands, ioctl-encoded (6.4+). The legacy numbers come from the
// 6.1 header (UBLK_CMD_*); GET_FEATURES (0x13) has no legacy form.
#ifndef UBLK_U_CMD_ADD_DEV
#define UBLK_U_CMD_GET_DEV_INFO _IOR('u', UBLK_CMD_GET_DEV_INFO, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_ADD_DEV _IOWR('u', UBLK_CMD_ADD_DEV, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_DEL_DEV _IOWR('u', UBLK_CMD_DEL_DEV, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_START_DEV _IOWR('u', UBLK_CMD_START_DEV, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_STOP_DEV _IOWR('u', UBLK_CMD_STOP_DEV, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_SET_PARAMS _IOWR('u', UBLK_CMD_SET_PARAMS, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_GET_PARAMS _IOR('u', UBLK_CMD_GET_PARAMS, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_START_USER_RECOVERY _IOWR('u', UBLK_CMD_START_USER_RECOVERY, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_END_USER_RECOVERY _IOWR('u', UBLK_CMD_END_USER_RECOVERY, struct ublksrv_ctrl_cmd)
#endif
#ifndef UBLK_U_CMD_GET_FEATURES
#define UBLK_U_CMD_GET_FEATURES _IOR('u', 0x13, struct ublksrv_ctrl_cmd)
#endif

// Queue commands on /dev/ublkcN, ioctl-encoded (6.4+).
#ifndef UBLK_U_IO_FETCH_REQ
#define UBLK_U_IO_FETCH_REQ _IOWR('u', UBLK_IO_FETCH_REQ, struct ublksrv_io_cmd)
#define UBLK_U_IO_COMMIT_AND_FETCH_REQ _IOWR('u', UBLK_IO_COMMIT_AND_FETCH_REQ, struct ublksrv_io_cmd)
#endif

// USER_COPY (6.5+): pread/pwrite on /dev/ublkcN at
// UBLKSRV_IO_BUF_OFFSET + (q_id << QID_OFF) + (tag << TAG_OFF) + offset.
#ifndef UBLK_IO_BUF_BITS
#define UBLK_IO_BUF_BITS 25
#define UBLK_TAG_OFF UBLK_IO_BUF_BITS
#define UBLK_TAG_BITS 16
#define UBLK_QID_OFF (UBLK_TAG_OFF + UBLK_TAG_BITS)
#endif

namespace dmr {
// mmap offset of queue q's io descriptors: one slot of
// round_up(UBLK_MAX_QUEUE_DEPTH * sizeof(ublksrv_io_desc), 4096) per queue.
constexpr unsigned long long kUblkCmdBufSlot =
    ((UBLK_MAX_QUEUE_DEPTH * sizeof(struct ublksrv_io_desc)) + 4095ULL) & ~4095ULL;
inline unsigned long long UblkUserCopyOffset(unsigned q, unsigned tag) {
  return UBLKSRV_IO_BUF_OFFSET + (static_cast<unsigned long long>(q) << UBLK_QID_OFF) +
         (static_cast<unsigned long long>(tag) << UBLK_TAG_OFF);
}
}  // namespace dmr

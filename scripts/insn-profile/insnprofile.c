/* qemu user-mode plugin (API v1): guest instructions executed per
 * translation block start address. At exit writes "ADDRESS COUNT" lines
 * (hex, decimal) to $INSN_PROFILE_OUT (default insn-profile.txt).
 * Companion of ../shared/tools/qemu-insn-count; see scripts/insn-profile.sh. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <stddef.h>
#include <stdbool.h>
typedef uint64_t qemu_plugin_id_t;
typedef struct {
    const char *target_name;
    struct { int min; int cur; } version;
    bool system_emulation;
    union { struct { int smp_vcpus; int max_vcpus; } system; };
} qemu_info_t;
struct qemu_plugin_tb;
enum qemu_plugin_op { QEMU_PLUGIN_INLINE_ADD_U64 };
typedef void (*tb_trans_cb)(qemu_plugin_id_t, struct qemu_plugin_tb *);
typedef void (*udata_cb)(qemu_plugin_id_t, void *);
void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t, tb_trans_cb);
void qemu_plugin_register_vcpu_tb_exec_inline(struct qemu_plugin_tb *, enum qemu_plugin_op, void *, uint64_t);
size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *);
uint64_t qemu_plugin_tb_vaddr(const struct qemu_plugin_tb *);
void qemu_plugin_register_atexit_cb(qemu_plugin_id_t, udata_cb, void *);

__attribute__((visibility("default"))) int qemu_plugin_version = 1;

/* Open-addressing table: one counter per (block address, block length). */
#define SLOTS (1u << 20)
static struct { uint64_t vaddr, n, count; } table[SLOTS];

static void on_trans(qemu_plugin_id_t id, struct qemu_plugin_tb *tb) {
    (void)id;
    uint64_t vaddr = qemu_plugin_tb_vaddr(tb), n = qemu_plugin_tb_n_insns(tb);
    uint64_t h = (vaddr * 0x9E3779B97F4A7C15ull + n) >> 44;
    for (uint64_t i = 0; i < SLOTS; i++) {
        uint64_t s = (h + i) & (SLOTS - 1);
        if (table[s].n == 0) { table[s].vaddr = vaddr; table[s].n = n; }
        if (table[s].vaddr == vaddr && table[s].n == n) {
            qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &table[s].count, n);
            return;
        }
    }
}

static void on_exit_cb(qemu_plugin_id_t id, void *p) {
    (void)id; (void)p;
    const char *path = getenv("INSN_PROFILE_OUT");
    FILE *f = fopen(path ? path : "insn-profile.txt", "w");
    if (!f) return;
    for (uint64_t s = 0; s < SLOTS; s++)
        if (table[s].count) fprintf(f, "%llx %llu\n", (unsigned long long)table[s].vaddr, (unsigned long long)table[s].count);
    fclose(f);
}

__attribute__((visibility("default")))
int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info, int argc, char **argv) {
    (void)info; (void)argc; (void)argv;
    qemu_plugin_register_vcpu_tb_trans_cb(id, on_trans);
    qemu_plugin_register_atexit_cb(id, on_exit_cb, NULL);
    return 0;
}

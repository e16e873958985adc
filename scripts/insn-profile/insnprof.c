/* Per-translation-block guest instruction counts (qemu plugin API v1): at exit,
 * one "vaddr instructions" line per block executed, into $INSNPROF_OUT
 * (default /tmp/insnprof.txt). scripts/insn-profile.sh builds and runs it. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <stddef.h>
#include <stdbool.h>
typedef uint64_t qemu_plugin_id_t;
typedef struct { const char *target_name; struct { int min; int cur; } version; bool system_emulation;
    union { struct { int smp_vcpus; int max_vcpus; } system; }; } qemu_info_t;
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
struct block { uint64_t vaddr, n, count; struct block *next; };
static struct block *blocks;
static void on_trans(qemu_plugin_id_t id, struct qemu_plugin_tb *tb) {
    (void)id;
    struct block *b = calloc(1, sizeof *b);
    b->vaddr = qemu_plugin_tb_vaddr(tb); b->n = qemu_plugin_tb_n_insns(tb); b->next = blocks; blocks = b;
    qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &b->count, 1);
}
static void on_exit_cb(qemu_plugin_id_t id, void *p) {
    (void)id; (void)p;
    FILE *f = fopen(getenv("INSNPROF_OUT") ? getenv("INSNPROF_OUT") : "/tmp/insnprof.txt", "w");
    for (struct block *b = blocks; b; b = b->next)
        if (b->count) fprintf(f, "%llx %llu\n", (unsigned long long)b->vaddr, (unsigned long long)(b->count * b->n));
    fclose(f);
}
__attribute__((visibility("default")))
int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info, int argc, char **argv) {
    (void)info; (void)argc; (void)argv;
    qemu_plugin_register_vcpu_tb_trans_cb(id, on_trans);
    qemu_plugin_register_atexit_cb(id, on_exit_cb, NULL);
    return 0;
}

/* Prints sizeof/offsetof of every shared structure, ring sizes and constants, as the
 * compiler lays them out from Xen's public headers. Built with -m64 and -m32: the i386
 * build gives the x86_32 blkif ABI. Output: one "name value" pair per line. */
#define __XEN_INTERFACE_VERSION__ 0x00040e00
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <xen/xen.h>
#include <xen/grant_table.h>
#include <xen/io/blkif.h>
#include <xen/io/netif.h>
#include <xen/io/xenbus.h>

#define SIZE(t) printf("%s.sizeof %zu\n", #t, sizeof(struct t))
#define OFF(t, f) printf("%s.%s %zu\n", #t, #f, offsetof(struct t, f))
#define VAL(n) printf("%s %lld\n", #n, (long long)(n))

static void ring_sizes(void)
{
    for (int pages = 1; pages <= 16; pages++) {
        printf("ring.blkif.%d %lu\n", pages,
               (unsigned long)__CONST_RING_SIZE(blkif, 4096 * pages));
        printf("ring.netif_tx.%d %lu\n", pages,
               (unsigned long)__CONST_RING_SIZE(netif_tx, 4096 * pages));
        printf("ring.netif_rx.%d %lu\n", pages,
               (unsigned long)__CONST_RING_SIZE(netif_rx, 4096 * pages));
        printf("ring.netif_ctrl.%d %lu\n", pages,
               (unsigned long)__CONST_RING_SIZE(xen_netif_ctrl, 4096 * pages));
    }
    printf("entry.blkif %zu\n", sizeof(union blkif_sring_entry));
    printf("entry.netif_tx %zu\n", sizeof(union netif_tx_sring_entry));
    printf("entry.netif_rx %zu\n", sizeof(union netif_rx_sring_entry));
    printf("entry.netif_ctrl %zu\n", sizeof(union xen_netif_ctrl_sring_entry));
}

int main(void)
{
    OFF(blkif_sring, req_prod); OFF(blkif_sring, req_event); OFF(blkif_sring, rsp_prod);
    OFF(blkif_sring, rsp_event); OFF(blkif_sring, pvt); OFF(blkif_sring, ring);

    SIZE(blkif_request_segment); OFF(blkif_request_segment, gref);
    OFF(blkif_request_segment, first_sect); OFF(blkif_request_segment, last_sect);
    SIZE(blkif_request); OFF(blkif_request, operation); OFF(blkif_request, nr_segments);
    OFF(blkif_request, handle); OFF(blkif_request, id); OFF(blkif_request, sector_number);
    OFF(blkif_request, seg);
    SIZE(blkif_request_discard); OFF(blkif_request_discard, operation);
    OFF(blkif_request_discard, flag); OFF(blkif_request_discard, handle);
    OFF(blkif_request_discard, id); OFF(blkif_request_discard, sector_number);
    OFF(blkif_request_discard, nr_sectors);
    SIZE(blkif_request_indirect); OFF(blkif_request_indirect, operation);
    OFF(blkif_request_indirect, indirect_op); OFF(blkif_request_indirect, nr_segments);
    OFF(blkif_request_indirect, id); OFF(blkif_request_indirect, sector_number);
    OFF(blkif_request_indirect, handle); OFF(blkif_request_indirect, indirect_grefs);
    SIZE(blkif_response); OFF(blkif_response, id); OFF(blkif_response, operation);
    OFF(blkif_response, status);

    SIZE(netif_tx_request); OFF(netif_tx_request, gref); OFF(netif_tx_request, offset);
    OFF(netif_tx_request, flags); OFF(netif_tx_request, id); OFF(netif_tx_request, size);
    SIZE(netif_tx_response); OFF(netif_tx_response, id); OFF(netif_tx_response, status);
    SIZE(netif_extra_info); OFF(netif_extra_info, type); OFF(netif_extra_info, flags);
    OFF(netif_extra_info, u.gso.size); OFF(netif_extra_info, u.gso.type);
    OFF(netif_extra_info, u.gso.pad); OFF(netif_extra_info, u.gso.features);
    OFF(netif_extra_info, u.mcast.addr); OFF(netif_extra_info, u.hash.type);
    OFF(netif_extra_info, u.hash.algorithm); OFF(netif_extra_info, u.hash.value);
    SIZE(netif_rx_request); OFF(netif_rx_request, id); OFF(netif_rx_request, gref);
    SIZE(netif_rx_response); OFF(netif_rx_response, id); OFF(netif_rx_response, offset);
    OFF(netif_rx_response, flags); OFF(netif_rx_response, status);
    SIZE(xen_netif_ctrl_request); OFF(xen_netif_ctrl_request, id);
    OFF(xen_netif_ctrl_request, type); OFF(xen_netif_ctrl_request, data);
    SIZE(xen_netif_ctrl_response); OFF(xen_netif_ctrl_response, id);
    OFF(xen_netif_ctrl_response, type); OFF(xen_netif_ctrl_response, status);
    OFF(xen_netif_ctrl_response, data);

    SIZE(grant_entry_v1); OFF(grant_entry_v1, flags); OFF(grant_entry_v1, domid);
    OFF(grant_entry_v1, frame);
    printf("grant_entry_v2.sizeof %zu\n", sizeof(grant_entry_v2_t));
    printf("grant_entry_v2.hdr.flags %zu\n", offsetof(grant_entry_v2_t, hdr.flags));
    printf("grant_entry_v2.hdr.domid %zu\n", offsetof(grant_entry_v2_t, hdr.domid));
    printf("grant_entry_v2.full_page.frame %zu\n", offsetof(grant_entry_v2_t, full_page.frame));
    printf("grant_entry_v2.sub_page.page_off %zu\n", offsetof(grant_entry_v2_t, sub_page.page_off));
    printf("grant_entry_v2.sub_page.length %zu\n", offsetof(grant_entry_v2_t, sub_page.length));
    printf("grant_entry_v2.sub_page.frame %zu\n", offsetof(grant_entry_v2_t, sub_page.frame));
    printf("grant_entry_v2.transitive.trans_domid %zu\n",
           offsetof(grant_entry_v2_t, transitive.trans_domid));
    printf("grant_entry_v2.transitive.gref %zu\n", offsetof(grant_entry_v2_t, transitive.gref));
    printf("grant_status.sizeof %zu\n", sizeof(grant_status_t));

    ring_sizes();

    VAL(BLKIF_OP_READ); VAL(BLKIF_OP_WRITE); VAL(BLKIF_OP_WRITE_BARRIER);
    VAL(BLKIF_OP_FLUSH_DISKCACHE); VAL(BLKIF_OP_RESERVED_1); VAL(BLKIF_OP_DISCARD);
    VAL(BLKIF_OP_INDIRECT); VAL(BLKIF_RSP_OKAY); VAL(BLKIF_RSP_ERROR);
    VAL(BLKIF_RSP_EOPNOTSUPP); VAL(VDISK_CDROM); VAL(VDISK_REMOVABLE); VAL(VDISK_READONLY);
    VAL(BLKIF_MAX_SEGMENTS_PER_REQUEST); VAL(BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST);
    VAL(BLKIF_DISCARD_SECURE);
    VAL(NETTXF_csum_blank); VAL(NETTXF_data_validated); VAL(NETTXF_more_data);
    VAL(NETTXF_extra_info); VAL(NETRXF_data_validated); VAL(NETRXF_csum_blank);
    VAL(NETRXF_more_data); VAL(NETRXF_extra_info); VAL(NETRXF_gso_prefix);
    VAL(XEN_NETIF_EXTRA_TYPE_NONE); VAL(XEN_NETIF_EXTRA_TYPE_GSO);
    VAL(XEN_NETIF_EXTRA_TYPE_MCAST_ADD); VAL(XEN_NETIF_EXTRA_TYPE_MCAST_DEL);
    VAL(XEN_NETIF_EXTRA_TYPE_HASH); VAL(XEN_NETIF_EXTRA_TYPE_MAX);
    VAL(XEN_NETIF_EXTRA_FLAG_MORE);
    VAL(XEN_NETIF_GSO_TYPE_NONE); VAL(XEN_NETIF_GSO_TYPE_TCPV4); VAL(XEN_NETIF_GSO_TYPE_TCPV6);
    VAL(NETIF_RSP_DROPPED); VAL(NETIF_RSP_ERROR); VAL(NETIF_RSP_OKAY); VAL(NETIF_RSP_NULL);
    VAL(XEN_NETIF_NR_SLOTS_MIN);
    VAL(XEN_NETIF_CTRL_TYPE_INVALID); VAL(XEN_NETIF_CTRL_TYPE_GET_HASH_FLAGS);
    VAL(XEN_NETIF_CTRL_TYPE_SET_HASH_FLAGS); VAL(XEN_NETIF_CTRL_TYPE_SET_HASH_KEY);
    VAL(XEN_NETIF_CTRL_TYPE_GET_HASH_MAPPING_SIZE);
    VAL(XEN_NETIF_CTRL_TYPE_SET_HASH_MAPPING_SIZE); VAL(XEN_NETIF_CTRL_TYPE_SET_HASH_MAPPING);
    VAL(XEN_NETIF_CTRL_TYPE_SET_HASH_ALGORITHM); VAL(XEN_NETIF_CTRL_TYPE_GET_GREF_MAPPING_SIZE);
    VAL(XEN_NETIF_CTRL_TYPE_ADD_GREF_MAPPING); VAL(XEN_NETIF_CTRL_TYPE_DEL_GREF_MAPPING);
    VAL(XEN_NETIF_CTRL_STATUS_SUCCESS); VAL(XEN_NETIF_CTRL_STATUS_NOT_SUPPORTED);
    VAL(XEN_NETIF_CTRL_STATUS_INVALID_PARAMETER); VAL(XEN_NETIF_CTRL_STATUS_BUFFER_OVERFLOW);
    VAL(XEN_NETIF_CTRL_HASH_TYPE_IPV4); VAL(XEN_NETIF_CTRL_HASH_TYPE_IPV4_TCP);
    VAL(XEN_NETIF_CTRL_HASH_TYPE_IPV6); VAL(XEN_NETIF_CTRL_HASH_TYPE_IPV6_TCP);
    VAL(_XEN_NETIF_CTRL_HASH_TYPE_IPV4); VAL(_XEN_NETIF_CTRL_HASH_TYPE_IPV4_TCP);
    VAL(_XEN_NETIF_CTRL_HASH_TYPE_IPV6); VAL(_XEN_NETIF_CTRL_HASH_TYPE_IPV6_TCP);
    VAL(XEN_NETIF_CTRL_HASH_ALGORITHM_NONE); VAL(XEN_NETIF_CTRL_HASH_ALGORITHM_TOEPLITZ);
    VAL(GTF_invalid); VAL(GTF_permit_access); VAL(GTF_accept_transfer); VAL(GTF_transitive);
    VAL(GTF_type_mask); VAL(GTF_readonly); VAL(GTF_reading); VAL(GTF_writing);
    VAL(GTF_PWT); VAL(GTF_PCD); VAL(GTF_PAT); VAL(GTF_sub_page);
    VAL(XenbusStateUnknown); VAL(XenbusStateInitialising); VAL(XenbusStateInitWait);
    VAL(XenbusStateInitialised); VAL(XenbusStateConnected); VAL(XenbusStateClosing);
    VAL(XenbusStateClosed); VAL(XenbusStateReconfiguring); VAL(XenbusStateReconfigured);
    return 0;
}
